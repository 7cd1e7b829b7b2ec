"""The Spectuner-D1 policy network: tokens, transformer encoder, autoregressive flow (method §5).
"method §N" is a section of docs/method.md.

Implements the policy pi(u | s) of Qiu et al. (arXiv:2511.21027): one token per transition of a
molecule in reach of the observed windows (spectroscopic features plus a patch of the observed
spectrum on a fixed velocity grid), one token with the molecule's partition function, a transformer
encoder (RMSNorm, SwiGLU) whose CLS output is the context, and a conditional autoregressive
normalising flow with a uniform base on the unit cube [0, 1]^P of the five LTE parameters
(order and mapping to physical units: method §3, done by the caller).

Shape letters: B batch, N transition tokens, T = N + 2 sequence length (CLS and partition-function
token first), D d_model, H heads, L patch length, E patch-encoder width, P physical parameters (5),
S flow samples, M flattened rows (S * B), K spline bins, C channels of an observed window.

Leaf module: torch, numpy and the standard library only; importing it does nothing.

    cfg = ModelConfig()
    net = PolicyNet(cfg)
    batch = collate([make_tokens(windows, lines, cfg)])
    u, log_p = net.sample(batch, 50)   # (50, 1, 5) in [0, 1], (50, 1)
"""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

C_KMS = 299792.458  # speed of light [km/s]
# Standardisation of the spectroscopic features, (value - centre) / scale, fixed so that a
# trained network reads any catalogue the same way. Chosen from CDMS/JPL ranges of organic
# molecules at 80-900 GHz: log10 A in [-9, -1], g_u in [1, 10^4], E in [0, 3000] K.
LOG10_A = (-5.0, 2.0)  # log10(A / s^-1)
LOG10_GU = (1.5, 1.0)  # log10 g_u
ASINH_E = (2.0, 1.5)  # asinh(E / 100 K), for E_low and E_up
E_SCALE_K = 100.0
LOG10_FREQ = (5.3, 0.3)  # log10(freq / MHz)
LOG10_PROXY = (-14.0, 3.0)  # log10 of the intensity proxy (see _log10_proxy)
LOG10_Q = (3.0, 1.5)  # log10 Q(T)
N_SPEC = 6  # spectroscopic features per transition token
N_PATCH = 7  # patch channels, see _patches
N_FINE = 3  # fine patch channels, see _fine_patches


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


# --- tokens (numpy in, torch out) ---


def _window_arrays(w) -> tuple:
    """(freq_MHz, T_K, rms_K, T_bg_K, beam_arcsec) of a dict or tuple window, ascending in freq."""
    if isinstance(w, dict):
        T = w["T_K"] if "T_K" in w else w["T_obs_K"]
        fields = (w["freq_MHz"], T, w["rms_K"], w.get("T_bg_K", 0.0), w.get("beam_arcsec"))
    else:
        fields = (tuple(w) + (0.0, None))[:5]
    freq = np.asarray(fields[0], dtype=np.float64)
    T = np.asarray(fields[1], dtype=np.float64)
    if freq.ndim != 1 or freq.shape != T.shape or freq.size < 2:
        raise ValueError(f"window freq_MHz {freq.shape} and T_K {T.shape} must be equal (C>=2,)")
    rms = np.broadcast_to(np.asarray(fields[2], dtype=np.float64), freq.shape)
    order = np.argsort(freq, kind="stable")
    beam = 0.0 if fields[4] is None else float(fields[4])
    return freq[order], T[order], rms[order], float(fields[3] or 0.0), beam


def _log10_proxy(lines: dict, T_K: float) -> np.ndarray:
    """log10(A g_u exp(-E_up / T) / freq^2): velocity-integrated optically thin LTE brightness.

    Up to per-molecule factors, tau_v J(T) (1 - exp(-h nu / k T)) reduces to this (method §2).
    """
    log10_Agu = np.log10(lines["A_s"] * lines["g_u"])
    return log10_Agu - lines["E_up_K"] / (T_K * math.log(10.0)) - 2.0 * np.log10(lines["freq_MHz"])


def _select(lines: dict, wins: list, cfg: ModelConfig) -> np.ndarray:
    """Indices of the transitions in reach of a window, strongest max_tokens kept, by frequency.

    A transition is in reach when its patch (rest frequency -+ v_width) overlaps a window.
    Ranking (ours, method §5): the intensity proxy at cfg.T_proxy_K, ties broken by frequency,
    so the same input always gives the same tokens (the reference samples at random).
    """
    freq = lines["freq_MHz"]
    half = freq * cfg.v_width_kms / C_KMS
    reach = np.zeros(freq.shape, dtype=bool)
    for f, *_ in wins:
        reach |= (freq - half <= f[-1]) & (freq + half >= f[0])
    # Lines with A = 0 or g_u = 0 add no opacity; they would only give log10(0) features.
    idx = np.flatnonzero(reach & (lines["A_s"] > 0) & (lines["g_u"] > 0))
    if idx.size > cfg.max_tokens:
        score = _log10_proxy({k: v[idx] for k, v in lines.items()}, cfg.T_proxy_K)
        idx = idx[np.lexsort((freq[idx], -score))[: cfg.max_tokens]]
    return idx[np.argsort(freq[idx], kind="stable")]


def _on_grid(grid: np.ndarray, f: np.ndarray, T: np.ndarray) -> tuple:
    """(valid channels, T with NaN -> 0, grid points inside the window, inside times the
    interpolated validity) of one window on a patch grid."""
    valid = np.isfinite(T)
    inside = (grid >= f[0]) & (grid <= f[-1])
    return valid, np.where(valid, T, 0.0), inside, inside * np.interp(grid, f, valid.astype(float))


def _patches(freq_t: np.ndarray, wins: list, cfg: ModelConfig) -> np.ndarray:
    """Observed spectrum around each transition on a velocity grid, (N,) -> (N, N_PATCH, L).

    Channels: 0 asinh(T / T_scale) by linear interpolation, 1 in-window mask, 2 peak flag (a
    native channel that is a local maximum above peak_nsigma * rms, put on the nearest grid point),
    3 asinh of that peak's height (narrow peaks survive the coarse grid), 4-6 asinh(rms / T_scale),
    asinh(T_bg / T_scale), asinh(beam / 1 arcsec) as constants inside the windows. Velocity is
    radio convention v = c (1 - freq / freq_t); where windows overlap, the later one wins.
    """
    L = cfg.patch_len
    v = np.linspace(-cfg.v_width_kms, cfg.v_width_kms, L)
    grid = freq_t[:, None] * (1.0 - v[None, :] / C_KMS)  # (N, L) rest frequencies [MHz]
    out = np.zeros((freq_t.size, N_PATCH, L))
    for f, T, rms, T_bg, beam in wins:
        valid, T0, inside, mask = _on_grid(grid, f, T)  # inside, mask (N, L)
        rows = np.where(inside[:, None, :], 0.0, out)  # (N, N_PATCH, L), this window replaces
        rows[:, 0] = mask * np.arcsinh(np.interp(grid, f, T0) / cfg.T_scale_K)
        rows[:, 1] = mask
        rows[:, 4] = mask * np.arcsinh(np.interp(grid, f, rms) / cfg.T_scale_K)
        rows[:, 5] = mask * np.arcsinh(T_bg / cfg.T_scale_K)
        rows[:, 6] = mask * np.arcsinh(beam)
        centre = T0[1:-1]
        peak = (centre > T0[:-2]) & (centre >= T0[2:]) & (centre > cfg.peak_nsigma * rms[1:-1])
        peak &= valid[1:-1] & valid[:-2] & valid[2:]
        f_pk, T_pk = f[1:-1][peak], centre[peak]
        v_pk = C_KMS * (1.0 - f_pk[None, :] / freq_t[:, None])  # (N, n_peaks)
        j = np.rint((v_pk + cfg.v_width_kms) / (v[1] - v[0])).astype(int)
        n, k = np.nonzero((j >= 0) & (j < L))
        rows[n, 2, j[n, k]] = 1.0
        np.maximum.at(rows[:, 3], (n, j[n, k]), np.arcsinh(T_pk[k] / cfg.T_scale_K))
        out = rows
    return out


def _fine_patches(freq_t: np.ndarray, wins: list, cfg: ModelConfig) -> np.ndarray:
    """Observed spectrum near each transition in fine velocity bins, (N,) -> (N, N_FINE, L_f).

    The coarse patch spaces its points 2.4 km/s apart, wider than the 0.3-2 km/s lines the box
    allows; these bins are 2 fine_width / fine_len wide (0.25 km/s by default) over |v| <=
    fine_width, the reach of the box's v_off plus a few FWHM (issue 12; ours). Channels: 0 the
    largest and 1 the smallest asinh(T / T_scale) of the native channels in a bin (a narrow
    peak between grid points is kept, not interpolated away), linear interpolation at the bin
    centre when no native channel falls in it; 2 in-window mask. Where windows overlap, the
    later one wins, as in _patches.
    """
    L, W = cfg.fine_len, cfg.fine_width_kms
    dv = 2.0 * W / L
    v_c = -W + dv * (np.arange(L) + 0.5)  # bin centres [km/s]
    grid = freq_t[:, None] * (1.0 - v_c[None, :] / C_KMS)  # (N, L_f) rest frequencies [MHz]
    out = np.zeros((freq_t.size, N_FINE, L))
    for f, T, _rms, _T_bg, _beam in wins:
        valid, T0, inside, mask = _on_grid(grid, f, T)  # inside, mask (N, L_f)
        centre = np.arcsinh(np.interp(grid, f, T0) / cfg.T_scale_K)  # (N, L_f)
        hi_pool, lo_pool = np.full_like(centre, -np.inf), np.full_like(centre, np.inf)
        # Native channels within the fine reach of each transition, flattened: (n,) pairs.
        lo = np.searchsorted(f, freq_t * (1.0 - W / C_KMS), side="left")
        hi = np.searchsorted(f, freq_t * (1.0 + W / C_KMS), side="right")
        count = hi - lo
        tok = np.repeat(np.arange(freq_t.size), count)
        chan = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        chan += np.repeat(lo, count)
        keep = valid[chan]
        tok, chan = tok[keep], chan[keep]
        j = np.floor((C_KMS * (1.0 - f[chan] / freq_t[tok]) + W) / dv).astype(int)
        ok = (j >= 0) & (j < L)
        tok, chan, j = tok[ok], chan[ok], j[ok]
        a = np.arcsinh(T0[chan] / cfg.T_scale_K)
        np.maximum.at(hi_pool, (tok, j), a)
        np.minimum.at(lo_pool, (tok, j), a)
        empty = ~np.isfinite(hi_pool)
        rows = np.where(inside[:, None, :], 0.0, out)  # (N, N_FINE, L_f), this window replaces
        rows[:, 0] = mask * np.where(empty, centre, hi_pool)
        rows[:, 1] = mask * np.where(empty, centre, lo_pool)
        rows[:, 2] = mask
        out = rows
    return out


def make_tokens(windows: list, lines: dict, cfg: ModelConfig, dtype=torch.float32) -> dict:
    """Tokens of one molecule observed in one or several windows (method §5).

    Args:
        windows: dicts with keys freq_MHz (C,) rest-frame channel centres (either order), T_K (C,)
            [K] (or T_obs_K; NaN = blanked), rms_K (float or (C,)), T_bg_K (float, default 0),
            beam_arcsec (float or None -> 0); or tuples in that order (e.g. spectuner.Window
            after shifting its frequencies to the rest frame).
        lines: rest-frame numpy arrays freq_MHz, A_s [s^-1], g_u, E_low_K, E_up_K (all (n_lines,))
            and log10_Q, shape (len(cfg.Q_temps_K),), log10 Q at cfg.Q_temps_K.
        cfg: model configuration.
        dtype: floating dtype of the returned tensors.

    Returns:
        dict of tensors: spec (N, N_SPEC) standardised [log10 A, log10 g_u, asinh E_low,
        asinh E_up, log10 freq, log10 proxy]; patch (N, N_PATCH, L); fine (N, N_FINE, L_f), only
        when cfg.fine_len > 0; logq (n_T,) standardised log10 Q; freq_MHz (N,) float64, the
        transitions' rest frequencies, ascending.

    Raises:
        ValueError: if log10_Q does not match cfg.Q_temps_K or a window's arrays are malformed.
    """
    log10_Q = np.asarray(lines["log10_Q"], dtype=np.float64)
    if log10_Q.shape != (len(cfg.Q_temps_K),):
        raise ValueError(f"log10_Q has shape {log10_Q.shape}, need ({len(cfg.Q_temps_K)},)")
    wins = [_window_arrays(w) for w in windows]
    keys = ("freq_MHz", "A_s", "g_u", "E_low_K", "E_up_K")
    lines = {k: np.atleast_1d(np.asarray(lines[k], dtype=np.float64)) for k in keys}
    idx = _select(lines, wins, cfg)
    sel = {k: v[idx] for k, v in lines.items()}
    std = [
        (np.log10(sel["A_s"]), LOG10_A),
        (np.log10(sel["g_u"]), LOG10_GU),
        (np.arcsinh(sel["E_low_K"] / E_SCALE_K), ASINH_E),
        (np.arcsinh(sel["E_up_K"] / E_SCALE_K), ASINH_E),
        (np.log10(sel["freq_MHz"]), LOG10_FREQ),
        (_log10_proxy(sel, cfg.T_proxy_K), LOG10_PROXY),
    ]
    spec = np.stack([(x - c) / s for x, (c, s) in std], axis=-1).reshape(-1, N_SPEC)  # (N, 6)
    out = {
        "spec": torch.as_tensor(spec, dtype=dtype),
        "patch": torch.as_tensor(_patches(sel["freq_MHz"], wins, cfg), dtype=dtype),
        "logq": torch.as_tensor((log10_Q - LOG10_Q[0]) / LOG10_Q[1], dtype=dtype),
        "freq_MHz": torch.as_tensor(sel["freq_MHz"], dtype=torch.float64),
    }
    if cfg.fine_len > 0:
        out["fine"] = torch.as_tensor(_fine_patches(sel["freq_MHz"], wins, cfg), dtype=dtype)
    return out


def collate(tokens: list, device=None) -> dict:
    """Pad a list of make_tokens outputs to one batch.

    Returns:
        dict: spec (B, N, N_SPEC), patch (B, N, N_PATCH, L), fine (B, N, N_FINE, L_f) when the
        tokens have it, logq (B, n_T), mask (B, N) bool, True for real tokens; N = max(1,
        longest token list), padding is zeros.
    """
    B, N = len(tokens), max(1, max(t["spec"].shape[0] for t in tokens))
    keys = [k for k in ("spec", "patch", "fine") if k in tokens[0]]
    out = {k: tokens[0][k].new_zeros((B, N) + tokens[0][k].shape[1:]) for k in keys}
    out["mask"] = torch.zeros(B, N, dtype=torch.bool)  # (B, N)
    for b, t in enumerate(tokens):
        n = t["spec"].shape[0]
        for k in keys:
            out[k][b, :n] = t[k]
        out["mask"][b, :n] = True
    out["logq"] = torch.stack([t["logq"] for t in tokens])  # (B, n_T)
    return {k: v.to(device) for k, v in out.items()}


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


# --- autoregressive flow on [0, 1]^P with a uniform base ---


def _pwq_bins(raw, bins: int, min_width: float, min_density: float) -> tuple:
    """Bin edges x_k, vertex densities v_k and CDF at the edges c_k of a piecewise-quadratic CDF.

    Muller et al. (2019, NIS): the density is linear inside each bin, so the CDF is quadratic.
    raw (M, 2K+1) -> widths (M, K), edges (M, K+1), densities (M, K+1), cdf (M, K+1).
    """
    w = min_width + (1.0 - bins * min_width) * torch.softmax(raw[:, :bins], -1)  # (M, K)
    cw = torch.cumsum(w, -1)[:, :-1]  # (M, K-1)
    edges = torch.cat([torch.zeros_like(w[:, :1]), cw, torch.ones_like(w[:, :1])], -1)
    w = edges[:, 1:] - edges[:, :-1]  # (M, K)
    h = raw[:, bins:]
    v = torch.exp(h - h.max(-1, keepdim=True).values)  # (M, K+1) in (0, 1]
    area = (w * (v[:, 1:] + v[:, :-1]) / 2).sum(-1, keepdim=True)  # (M, 1)
    v = (1.0 - min_density) * v / area + min_density  # integrates to 1, >= min_density
    cdf = torch.cumsum(w * (v[:, 1:] + v[:, :-1]) / 2, -1)[:, :-1]  # (M, K-1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf, torch.ones_like(cdf[:, :1])], -1)
    return w, edges, v, cdf


def _pwq(x, raw, bins: int, min_width: float, min_density: float, inverse: bool) -> tuple:
    """CDF y = F(x) (or x = F^-1(y) if inverse) of one dimension, (M,) -> ((M,), log p(x) (M,))."""
    w, edges, v, cdf = _pwq_bins(raw, bins, min_width, min_density)
    knots = cdf if inverse else edges
    k = (x[:, None] >= knots[:, 1:-1]).sum(-1, keepdim=True)  # (M, 1) bin index 0..K-1
    wk, x0, c0 = w.gather(1, k)[:, 0], edges.gather(1, k)[:, 0], cdf.gather(1, k)[:, 0]
    v0, v1 = v.gather(1, k)[:, 0], v.gather(1, k + 1)[:, 0]
    if inverse:
        # Solve c0 + wk (v0 a + (v1 - v0) a^2 / 2) = x for a in [0, 1]; the root in this form
        # stays accurate when v1 ~ v0 (no cancellation), and the discriminant is >= (wk v1)^2.
        c = (x - c0).clamp_min(0.0)
        b = wk * v0
        disc = (b * b + 2.0 * wk * (v1 - v0) * c).clamp_min(0.0)
        a = (2.0 * c / (b + torch.sqrt(disc))).clamp(0.0, 1.0)
        y = (x0 + a * wk).clamp(0.0, 1.0)
    else:
        a = ((x - x0) / wk).clamp(0.0, 1.0)
        y = (c0 + wk * a * (v0 + a * (v1 - v0) / 2)).clamp(0.0, 1.0)
    return y, torch.log(v0 + a * (v1 - v0))


class AutoregressiveSpline(nn.Module):
    """Autoregressive piecewise-quadratic transform of [0, 1]^P, conditioned on a context.

    Dimension order[i] maps through a monotone CDF whose 2K+1 bin parameters come from an MLP of
    (context, x[order[:i]]). forward (data -> base) and inverse return (y, ladj).
    """

    def __init__(
        self,
        features: int,
        context: int,
        hidden_features: tuple,
        bins: int,
        min_width: float,
        min_density: float,
        order: tuple,
    ):
        super().__init__()
        self.order, self.bins = order, bins
        self.min_width, self.min_density = min_width, min_density
        self.mlps = nn.ModuleList()
        for i in range(features):
            sizes = (context + i,) + tuple(hidden_features)
            layers = []
            for a, b in zip(sizes, sizes[1:]):
                layers += [nn.Linear(a, b), nn.SiLU()]
            last = nn.Linear(sizes[-1], 2 * bins + 1)
            with torch.no_grad():  # near-uniform start, yet gradients reach every layer
                last.weight.mul_(0.01)
                last.bias.zero_()
            self.mlps.append(nn.Sequential(*layers, last))

    def _run(self, x, context, inverse: bool) -> tuple:
        """One pass over the dimensions; the conditioner always reads data-space values."""
        data, ladj = [None] * len(self.order), x.new_zeros(x.shape[0])  # P columns of (M,), (M,)
        out = [None] * len(self.order)
        for i, d in enumerate(self.order):
            prev = [2.0 * (data[e] if inverse else x[:, e])[:, None] - 1.0 for e in self.order[:i]]
            h = torch.cat([context] + prev, -1)  # (M, D + i)
            raw = self.mlps[i](h)  # (M, 2K+1)
            out[d], log_p = _pwq(x[:, d], raw, self.bins, self.min_width, self.min_density, inverse)
            data[d] = out[d] if inverse else x[:, d]
            ladj = ladj - log_p if inverse else ladj + log_p
        return torch.stack(out, -1), ladj  # (M, P), (M,)

    def forward(self, x, context) -> tuple:
        return self._run(x, context, inverse=False)

    def inverse(self, y, context) -> tuple:
        return self._run(y, context, inverse=True)


class Flow(nn.Module):
    """Conditional flow: a list of transforms from data u in [0, 1]^P to a uniform base.

    The base U(0, 1)^P has log-density 0 on the cube, so log p(u) is the summed ladj. Successive
    transforms reverse the variable order so every dimension is conditioned on every other.
    """

    def __init__(self, features: int, context: int, cfg: ModelConfig):
        super().__init__()
        self.features = features
        orders = [tuple(range(features)), tuple(reversed(range(features)))]
        spline = (cfg.hidden_features, cfg.bins, cfg.min_bin_width, cfg.min_density)
        self.transforms = nn.ModuleList(
            AutoregressiveSpline(features, context, *spline, orders[t % 2])
            for t in range(cfg.transforms)
        )

    def log_prob(self, u, context):
        """log p(u | context): u (..., B, P), context (B, D) -> (..., B)."""
        lead = u.shape[:-1]
        x = u.reshape(-1, self.features)  # (M, P)
        ctx = context.expand(lead + context.shape[-1:]).reshape(x.shape[0], -1)  # (M, D)
        log_p = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ladj = t(x, ctx)
            log_p = log_p + ladj
        return log_p.reshape(lead)

    def sample(self, context, n: int, generator=None) -> tuple:
        """n samples per context by exact inversion: context (B, D) -> (n, B, P), (n, B)."""
        B = context.shape[0]
        z = torch.rand(n * B, self.features, generator=generator, dtype=context.dtype)  # (M, P)
        z = z.to(context.device)
        ctx = context.expand(n, B, context.shape[-1]).reshape(n * B, -1)  # (M, D)
        log_p = z.new_zeros(n * B)
        for t in reversed(self.transforms):
            z, ladj = t.inverse(z, ctx)
            log_p = log_p - ladj
        return z.reshape(n, B, self.features), log_p.reshape(n, B)


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
        self.flow = Flow(cfg.features, cfg.d_model, cfg)

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
