"""The Spectuner-D1 policy network (docs/method.md §5): config, transformer encoder, PolicyNet,
and the policy files.

Implements the policy pi(u | s) of Qiu et al. (arXiv:2511.21027): the tokens of a molecule in
reach of the observed windows (tokens.py: spectroscopic features plus patches of the observed
spectrum), one token with the molecule's partition function, a transformer encoder (RMSNorm,
SwiGLU) whose CLS output is the context, and a conditional autoregressive normalising flow with
a uniform base on the unit cube [0, 1]^P of the five LTE parameters (flow.py; order and mapping
to physical units: docs/method.md §3, done by the caller). `make_tokens` and `collate` are
re-exported here, so `model.make_tokens` keeps working. "method §N" is a section of
docs/method.md.

Shape letters: B batch, N transition tokens, T = N + 2 sequence length (CLS and partition-function
token first), D d_model, H heads, L patch length, E patch-encoder width, M real tokens of a batch,
P physical parameters (5), S flow samples.

Imports the two leaves tokens.py and flow.py; torch and the standard library otherwise;
importing it does nothing.

    cfg = ModelConfig()
    net = PolicyNet(cfg)
    batch = collate([make_tokens(windows, lines, cfg)])
    u, log_p = net.sample(batch, 50)   # (50, 1, 5) in [0, 1], (50, 1)
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flow import Flow
from tokens import N_FINE, N_PATCH, N_SPEC, collate, make_tokens  # noqa: F401  (model.X API)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the tokens, the encoder and the flow; saved with the weights by save_policy."""

    d_model: int = 128  # transformer width D
    n_heads: int = 4  # attention heads, divides d_model
    n_layers: int = 3  # transformer blocks
    ff_hidden: int = 256  # SwiGLU hidden width
    patch_len: int = 128  # velocity grid points L per patch
    v_width_kms: float = 150.0  # patch half-width [km/s] and reach of a transition
    fine_len: int = 160  # bins L_f of the fine patch; 0 = none (policy files made before it)
    fine_width_kms: float = 20.0  # fine patch half-width [km/s]: |v_off| <= 12 plus a few FWHM
    patch_channels: int = 32  # width E of the 1-D conv patch encoder
    max_tokens: int = 128  # most transition tokens kept per molecule
    T_proxy_K: float = 150.0  # temperature of the intensity proxy that ranks transitions [K]
    T_scale_K: float = 1.0  # intensities enter as asinh(T / T_scale_K)
    peak_nsigma: float = 4.0  # peak flag threshold, in units of the rms
    Q_temps_K: tuple = (9.375, 18.75, 37.5, 75.0, 150.0, 300.0, 500.0, 1000.0)  # log10 Q at [K]
    features: int = 5  # P, flow dimensions (unit cube of method §3)
    transforms: int = 2  # autoregressive spline transforms, alternating variable order
    bins: int = 16  # K, piecewise-quadratic bins per dimension
    hidden_features: tuple = (128, 128)  # hidden widths of each conditioner MLP
    min_bin_width: float = 1e-3  # floor of a bin's width in [0, 1]
    min_density: float = 1e-3  # density mixed in uniformly: p >= min_density everywhere


# --- transformer encoder ---


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(RMSNorm x), then x + SwiGLU(RMSNorm x)."""

    def __init__(self, dim: int, n_heads: int, ff_hidden: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.ff = SwiGLU(dim, ff_hidden)

    def forward(self, x, keep):
        B, T, D = x.shape
        H = self.n_heads
        qkv = self.qkv(self.norm1(x)).view(B, T, 3, H, D // H)  # (B, T, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D/H)
        # No positional encoding: the CLS output is invariant to the order of the transitions;
        # padded keys are excluded, so padding does not change the real tokens' outputs either.
        allowed = keep[:, None, None, :]  # (B, 1, 1, T), True = attend
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, H, T, D/H)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, D))  # (B, T, D)
        return x + self.ff(self.norm2(x))


class PatchEncoder(nn.Module):
    """Three stride-2 1-D convolutions over a patch, flattened (position = velocity is kept).

    A cheaper stand-in for the reference's attention within each patch: (M, N_PATCH, L) -> (M, E').
    """

    def __init__(self, L: int, width: int, channels: int = N_PATCH):
        super().__init__()
        chans = (channels, width // 2, width, width)
        self.convs = nn.ModuleList(
            nn.Conv1d(a, b, kernel_size=5, stride=2, padding=2) for a, b in zip(chans, chans[1:])
        )
        self.out_features = width * math.ceil(L / 8)

    def forward(self, patch):
        for conv in self.convs:
            patch = F.silu(conv(patch))  # (M, E, ceil(L / 2^i))
        return patch.flatten(1)  # (M, E * ceil(L / 8))


class Encoder(nn.Module):
    """Tokens -> context (B, D): [CLS, Q token, transition tokens] through the transformer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.d_model
        self.patch = PatchEncoder(cfg.patch_len, cfg.patch_channels)
        self.embed = nn.Linear(self.patch.out_features + N_SPEC, D)
        if cfg.fine_len > 0:
            self.fine = PatchEncoder(cfg.fine_len, cfg.patch_channels, N_FINE)
            # Zero at the start, so a network made before the fine patch, loaded into this one,
            # proposes exactly what it did and learns to use the fine bins (model.upgrade).
            self.embed_fine = nn.Linear(self.fine.out_features, D)
            nn.init.zeros_(self.embed_fine.weight)
            nn.init.zeros_(self.embed_fine.bias)
        self.embed_q = nn.Linear(len(cfg.Q_temps_K), D)
        self.cls = nn.Parameter(0.02 * torch.randn(D))
        self.blocks = nn.ModuleList(
            Block(D, cfg.n_heads, cfg.ff_hidden) for _ in range(cfg.n_layers)
        )
        self.norm = RMSNorm(D)

    def forward(self, batch: dict):
        mask, spec = batch["mask"], batch["spec"]
        B, N = mask.shape
        feats = spec.new_zeros(B, N, self.patch.out_features)  # (B, N, E')
        feats[mask] = self.patch(batch["patch"][mask])  # real tokens only: (M, E')
        tok = self.embed(torch.cat([feats, spec], -1))  # (B, N, D)
        if hasattr(self, "fine"):
            fine = spec.new_zeros(B, N, self.fine.out_features)  # (B, N, E_f')
            fine[mask] = self.fine(batch["fine"][mask])  # (M, E_f')
            tok = tok + self.embed_fine(fine)  # (B, N, D)
        q = self.embed_q(batch["logq"])[:, None]  # (B, 1, D)
        x = torch.cat([self.cls.expand(B, 1, -1), q, tok], 1)  # (B, T, D)
        keep = torch.cat([mask.new_ones(B, 2), mask], 1)  # (B, T)
        for block in self.blocks:
            x = block(x, keep)
        return self.norm(x[:, 0])  # (B, D)


# --- policy ---


class PolicyNet(nn.Module):
    """pi(u | s): tokens of (windows, molecule) -> context -> flow over the unit cube.

    Raises:
        ValueError: if cfg.d_model is not divisible by cfg.n_heads.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.flow = Flow(
            cfg.features,
            cfg.d_model,
            cfg.transforms,
            cfg.hidden_features,
            cfg.bins,
            cfg.min_bin_width,
            cfg.min_density,
        )

    def forward(self, batch: dict) -> torch.Tensor:
        """Context vectors (B, D) of a collated batch."""
        return self.encoder(batch)

    def sample(self, batch: dict, n: int, generator=None) -> tuple:
        """n actions per state: returns u (n, B, P) in [0, 1] and log pi(u | s) (n, B)."""
        return self.flow.sample(self(batch), n, generator)

    def log_prob(self, u: torch.Tensor, batch: dict) -> torch.Tensor:
        """log pi(u | s) for u (B, P) or (S, B, P) -> (B,) or (S, B)."""
        return self.flow.log_prob(u, self(batch))


def save_policy(path, net: PolicyNet, cfg: ModelConfig) -> None:
    """Write the state dict and config, readable with torch.load(path, weights_only=True)."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    torch.save({"config": config, "state_dict": net.state_dict()}, path)


def load_policy(path, device="cpu") -> tuple:
    """Read a file written by save_policy: returns (PolicyNet in eval mode, ModelConfig)."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()}
    config.setdefault("fine_len", 0)  # files written before the fine patch have none
    cfg = ModelConfig(**config)
    net = PolicyNet(cfg).to(device)
    net.load_state_dict(ckpt["state_dict"])
    return net.eval(), cfg


def upgrade(net: PolicyNet, cfg: ModelConfig) -> PolicyNet:
    """A network of cfg holding the weights of net, a policy without the fine patch.

    The fine patch's embedding starts at zero, so the result proposes exactly what net does.

    Raises:
        ValueError: if the two networks differ in anything but the fine patch.
    """
    new = PolicyNet(cfg).to(next(net.parameters()).device)
    same = dataclasses.replace(net.cfg, fine_len=cfg.fine_len, fine_width_kms=cfg.fine_width_kms)
    if same != cfg:
        raise ValueError(f"cannot upgrade a policy of {net.cfg} to {cfg}: they differ in more")
    missing, unexpected = new.load_state_dict(net.state_dict(), strict=False)
    fine = ("encoder.fine.", "encoder.embed_fine.")
    assert not unexpected and all(k.startswith(fine) for k in missing), (missing, unexpected)
    return new
