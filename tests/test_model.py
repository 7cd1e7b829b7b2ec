"""Tests of model.py, tokens.py and flow.py: tokens, encoder invariances and flow exactness
(float64, tiny sizes)."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import flow
import model
import tokens

C_KMS = 299792.458
TINY = model.ModelConfig(
    d_model=16,
    n_heads=2,
    n_layers=2,
    ff_hidden=24,
    patch_len=16,
    patch_channels=8,
    max_tokens=6,
    Q_temps_K=(10.0, 100.0, 1000.0),
    transforms=2,
    bins=5,
    hidden_features=(12,),
)


def _lines(n=20, seed=0, lo=99_800.0, hi=100_400.0):
    """A random line list between lo and hi MHz, with upper energies from E_low + h nu / k."""
    rng = np.random.default_rng(seed)
    freq = np.sort(rng.uniform(lo, hi, n))
    E_low = rng.uniform(0.0, 500.0, n)
    return {
        "freq_MHz": freq,
        "A_s": 10 ** rng.uniform(-6, -4, n),
        "g_u": rng.integers(1, 60, n).astype(float),
        "E_low_K": E_low,
        "E_up_K": E_low + 4.799243e-5 * freq,
        "log10_Q": np.array([1.0, 2.5, 4.0]),
    }


def _windows(lines, seed=1):
    """Two windows (one descending) with Gaussian lines at the catalogue frequencies plus noise."""
    rng = np.random.default_rng(seed)
    out = []
    for lo, hi, descending in ((99_900.0, 100_050.0, False), (100_150.0, 100_300.0, True)):
        freq = np.linspace(lo, hi, 300)[:: -1 if descending else 1]
        sigma = 2.0 / 2.355 * freq / C_KMS  # 2 km/s FWHM in MHz
        T = sum(np.exp(-0.5 * ((freq - f) / sigma) ** 2) for f in lines["freq_MHz"])
        out.append(
            {
                "freq_MHz": freq,
                "T_K": 5.0 * T + rng.normal(0, 0.05, freq.size),
                "rms_K": 0.05,
                "T_bg_K": 2.0,
                "beam_arcsec": 0.5,
            }
        )
    return out


def _net(seed=0, cfg=TINY):
    torch.manual_seed(seed)
    return model.PolicyNet(cfg).double()


def _tokens(seed=0, cfg=TINY):
    lines = _lines(seed=seed)
    return model.make_tokens(_windows(lines), lines, cfg, dtype=torch.float64)


def _sharpen(f, std=1.5, seed=3):
    """Give the conditioners' last layers O(1) weights so the density is far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in f.transforms:
            for mlp in t.mlps:
                mlp[-1].weight.copy_(std * torch.randn(mlp[-1].weight.shape, generator=gen))
                mlp[-1].bias.copy_(std * torch.randn(mlp[-1].bias.shape, generator=gen))
    return f


# --- tokens ---


def test_tokens_shapes_reach_and_strongest_selection():
    lines = _lines(n=40)
    wins = _windows(lines)
    tok = model.make_tokens(wins, lines, TINY)
    L = TINY.patch_len
    assert tok["spec"].shape == (TINY.max_tokens, model.N_SPEC)
    assert tok["patch"].shape == (TINY.max_tokens, model.N_PATCH, L)
    assert tok["logq"].shape == (3,) and tok["spec"].dtype == torch.float32
    # Independent ranking: in reach of a window (patch overlap), then A g_u exp(-E_up/T) / nu^2.
    f = lines["freq_MHz"]
    half = f * TINY.v_width_kms / C_KMS
    reach = np.zeros(f.size, bool)
    for w in wins:
        reach |= (f + half >= w["freq_MHz"].min()) & (f - half <= w["freq_MHz"].max())
    assert 0 < TINY.max_tokens < reach.sum() < f.size
    strength = lines["A_s"] * lines["g_u"] * np.exp(-lines["E_up_K"] / 150.0) / f**2
    best = np.sort(f[reach][np.argsort(-strength[reach])[: TINY.max_tokens]])
    np.testing.assert_array_equal(tok["freq_MHz"].numpy(), best)
    again = model.make_tokens(wins, lines, TINY)
    assert all(torch.equal(tok[k], again[k]) for k in tok)


def test_tokens_ties_and_catalogue_order(monkeypatch):
    lines = _lines(n=30)
    wins = _windows(lines)
    perm = np.random.default_rng(0).permutation(30)
    shuffled = {k: v[perm] if k != "log10_Q" else v for k, v in lines.items()}
    a, b = model.make_tokens(wins, lines, TINY), model.make_tokens(wins, shuffled, TINY)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Equal intensity proxies everywhere: the lowest frequencies in reach win.
    monkeypatch.setattr(tokens, "_log10_proxy", lambda lines, T_K: np.zeros(lines["A_s"].size))
    wide = [{"freq_MHz": np.linspace(99_000, 101_000, 50), "T_K": np.zeros(50), "rms_K": 1.0}]
    tok = model.make_tokens(wide, shuffled, TINY)
    np.testing.assert_array_equal(tok["freq_MHz"].numpy(), lines["freq_MHz"][: TINY.max_tokens])


def test_patch_contents_and_window_order():
    cfg = TINY
    f0 = 100_000.0
    lines = _one_line(f0)
    # Window covering only v > 0 (freq below f0), 3 K line at v = +10 km/s, flat 0.1 K elsewhere.
    freq = np.linspace(f0 * (1 - 200 / C_KMS), f0 * (1 - 1 / C_KMS), 2000)
    v = C_KMS * (1 - freq / f0)
    T = 0.1 + 3.0 * np.exp(-0.5 * ((v - 10.0) / 3.0) ** 2)
    win = {"freq_MHz": freq, "T_K": T, "rms_K": 0.1, "T_bg_K": 5.0, "beam_arcsec": None}
    patch = model.make_tokens([win], lines, cfg, torch.float64)["patch"][0].numpy()
    grid = np.linspace(-cfg.v_width_kms, cfg.v_width_kms, cfg.patch_len)
    inside = (grid >= 1.0) & (grid <= 200.0)
    np.testing.assert_array_equal(patch[1], inside.astype(float))
    expected = np.arcsinh(0.1 + 3.0 * np.exp(-0.5 * ((grid - 10.0) / 3.0) ** 2)) * inside
    np.testing.assert_allclose(patch[0], expected, atol=1e-3)
    j = np.argmin(np.abs(grid - 10.0))
    assert patch[2].sum() == 1.0 and patch[2, j] == 1.0
    assert patch[3, j] == pytest.approx(np.arcsinh(3.1), abs=1e-4)
    np.testing.assert_allclose(patch[5], np.arcsinh(5.0) * inside)
    np.testing.assert_array_equal(patch[6], 0.0)  # beam None -> 0
    flipped = (freq[::-1], T[::-1], np.full(freq.size, 0.1), 5.0)  # tuple, per-channel rms
    patch2 = model.make_tokens([flipped], lines, cfg, torch.float64)["patch"][0].numpy()
    np.testing.assert_array_equal(patch, patch2)


def test_tokens_reject_bad_input():
    lines = _lines()
    wins = _windows(lines)
    with pytest.raises(ValueError, match="log10_Q"):
        model.make_tokens(wins, dict(lines, log10_Q=np.zeros(5)), TINY)
    with pytest.raises(ValueError, match="window"):
        model.make_tokens([(np.arange(10.0), np.zeros(9), 1.0)], lines, TINY)
    with pytest.raises(ValueError, match="n_heads"):
        model.PolicyNet(model.ModelConfig(d_model=10, n_heads=4))


def test_collate_pads_and_masks():
    a, b = _tokens(0), _tokens(1)
    b = {k: v[:3] if k != "logq" else v for k, v in b.items()}
    empty = {k: v[:0] if k != "logq" else v for k, v in a.items()}
    batch = model.collate([a, b, empty])
    assert batch["spec"].shape == (3, a["spec"].shape[0], model.N_SPEC)
    assert batch["patch"].shape == (3, a["spec"].shape[0], model.N_PATCH, TINY.patch_len)
    assert batch["mask"].sum(1).tolist() == [a["spec"].shape[0], 3, 0]
    assert torch.all(batch["spec"][1, 3:] == 0)
    ctx = _net()(batch)  # an empty token list still has the CLS and Q tokens
    assert ctx.shape == (3, TINY.d_model) and torch.isfinite(ctx).all()


# --- encoder ---


def test_padding_and_order_do_not_change_context():
    net = _net()
    a, b = _tokens(0), _tokens(1)
    b = {k: v[:2] if k != "logq" else v for k, v in b.items()}  # shorter, so padded below
    alone = net(model.collate([b]))
    padded = net(model.collate([a, b]))
    torch.testing.assert_close(padded[1], alone[0], rtol=0, atol=1e-12)
    perm = torch.randperm(a["spec"].shape[0], generator=torch.Generator().manual_seed(0))
    assert not torch.equal(perm, torch.arange(perm.numel()))
    shuffled = {k: v[perm] if k != "logq" else v for k, v in a.items()}
    torch.testing.assert_close(net(model.collate([shuffled]))[0], padded[0], rtol=0, atol=1e-12)
    other = net(model.collate([_tokens(2)]))  # a different input does change it
    assert (other[0] - padded[0]).abs().max() > 1e-3


def test_gradients_reach_every_parameter():
    net = _net()
    batch = model.collate([_tokens(0), _tokens(1)])
    u = torch.rand(3, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    net.log_prob(u, batch).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    # The fine patch's embedding starts at zero (model.upgrade), so its encoder has no gradient
    # until one step has moved the embedding; the embedding itself must have one.
    assert set(missing) == {n for n, _ in net.named_parameters() if n.startswith("encoder.fine.")}
    with torch.no_grad():
        net.encoder.embed_fine.weight.normal_(0.0, 0.1)
    net.zero_grad()
    net.log_prob(u, batch).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


# --- flow ---


def test_transform_inverse_round_trip():
    torch.manual_seed(0)
    t = flow.AutoregressiveSpline(5, 4, (16,), 6, 1e-3, 1e-3, (0, 1, 2, 3, 4)).double()
    with torch.no_grad():
        for mlp in t.mlps:
            mlp[-1].weight.normal_(0.0, 2.0)
    ctx = torch.randn(200, 4, dtype=torch.float64)
    x = torch.rand(200, 5, dtype=torch.float64)
    x[0] = torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0])  # the cube's corners are exact
    y, ladj = t(x, ctx)
    x2, ladj_inv = t.inverse(y, ctx)
    assert torch.all((y >= 0) & (y <= 1))
    torch.testing.assert_close(x2, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(ladj_inv, -ladj, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_matches_log_prob(dtype):
    net = _net().to(dtype)
    _sharpen(net.flow)
    batch = model.collate([_tokens(0, cfg=TINY), _tokens(1, cfg=TINY)])
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    gen = torch.Generator().manual_seed(0)
    u, log_p = net.sample(batch, 64, generator=gen)
    assert u.shape == (64, 2, 5) and log_p.shape == (64, 2) and u.dtype == dtype
    assert torch.all((u >= 0) & (u <= 1)) and torch.isfinite(log_p).all()
    assert log_p.std() > 0.1  # not the uniform start
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(net.log_prob(u, batch), log_p, rtol=0, atol=tol)
    assert net.log_prob(u[0], batch).shape == (2,)
    u2, _ = net.sample(batch, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(u, u2)


def test_density_integrates_to_one():
    torch.manual_seed(0)
    f = flow.Flow(
        2, 3, transforms=2, hidden_features=(8,), bins=4, min_width=1e-3, min_density=1e-3
    )
    f = _sharpen(f.double())
    ctx = torch.randn(1, 3, dtype=torch.float64)
    n = 800
    g = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # midpoint rule on [0, 1]^2
    uu = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 1, 2)  # (n^2, 1, 2)
    with torch.no_grad():
        p = f.log_prob(uu, ctx).exp().reshape(n, n)
    assert p.max() / p.min() > 5.0  # far from uniform, so the check means something
    assert p.mean().item() == pytest.approx(1.0, abs=2e-4)
    marginal = p.mean(1)  # density of u_0
    assert marginal.mean().item() == pytest.approx(1.0, abs=2e-4)
    # The first transform's dimension 0 alone is a 1-D density on [0, 1]; fine midpoint grid.
    m = 20_000
    x = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    with torch.no_grad():
        raw = f.transforms[0].mlps[0](ctx.expand(m, 3))  # (m, 2K+1)
        _, log_p0 = flow._pwq(x, raw, 4, 1e-3, 1e-3, inverse=False)
    assert log_p0.exp().mean().item() == pytest.approx(1.0, abs=1e-6)


def test_log_prob_matches_autograd_jacobian():
    torch.manual_seed(1)
    f = flow.Flow(
        5, 3, transforms=2, hidden_features=(8,), bins=5, min_width=1e-3, min_density=1e-3
    )
    f = _sharpen(f.double())
    ctx = torch.randn(1, 3, dtype=torch.float64)

    def to_base(u):
        x = u[None]
        for t in f.transforms:
            x, _ = t(x, ctx)
        return x[0]

    for seed in range(3):
        u = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        jac = torch.autograd.functional.jacobian(to_base, u)  # (5, 5)
        sign, logdet = torch.linalg.slogdet(jac)
        assert sign > 0
        log_p = f.log_prob(u[None], ctx)[0]
        assert log_p.item() == pytest.approx(logdet.item(), abs=1e-9)
        assert abs(log_p.item()) > 0.1


def test_save_load_round_trip(tmp_path):
    net = _net().float()
    path = tmp_path / "policy.pt"
    model.save_policy(path, net, TINY)
    raw = torch.load(path, weights_only=True)
    assert raw["config"]["d_model"] == TINY.d_model
    net2, cfg2 = model.load_policy(path)
    assert cfg2 == TINY and not net2.training
    batch = model.collate([model.make_tokens(_windows(_lines()), _lines(), TINY)])
    torch.testing.assert_close(net2(batch), net(batch), rtol=0, atol=0)


def test_default_config_size():
    net = model.PolicyNet(model.ModelConfig())
    n = sum(p.numel() for p in net.parameters())
    assert n * 4 < 20e6  # float32 weights under 20 MB, trainable on two CPU cores
    shipped = Path(__file__).resolve().parents[1] / "data" / "policy.pt"
    if shipped.exists():  # the shipped policy is a network of the default sizes
        net2, cfg2 = model.load_policy(shipped)
        # max_tokens (how many tokens are kept) and the fine patch do not set the other weights
        keep = dict(fine_len=cfg2.fine_len, fine_width_kms=cfg2.fine_width_kms,
                    max_tokens=cfg2.max_tokens)  # fmt: skip
        assert dataclasses.replace(model.ModelConfig(), **keep) == cfg2
        weights = torch.load(shipped, weights_only=True)["state_dict"]
        n2 = sum(p.numel() for p in model.PolicyNet(cfg2).parameters())
        assert sum(v.numel() for v in weights.values()) == n2


# --- fine patch (issue 12) ---


def _one_line(f0=100_000.0):
    return {
        "freq_MHz": np.array([f0]),
        "A_s": np.array([1e-5]),
        "g_u": np.array([3.0]),
        "E_low_K": np.array([10.0]),
        "E_up_K": np.array([14.8]),
        "log10_Q": np.zeros(3),
    }


def test_fine_patch_keeps_a_narrow_line_between_coarse_points():
    """A 0.3 km/s line (the box's narrowest) at +5.1 km/s: the coarse patch's points are 2.4 km/s
    apart at the default sizes, the fine bins 0.25 km/s; the bin holding the line's peak channel
    holds its height, the bin of the smallest value next to it the minimum."""
    cfg = dataclasses.replace(TINY, fine_len=160, fine_width_kms=20.0)
    f0 = 100_000.0
    freq = np.linspace(f0 * (1 - 30 / C_KMS), f0 * (1 + 10 / C_KMS), 4000)  # v from -10 to +30
    v = C_KMS * (1 - freq / f0)
    T = 2.0 * np.exp(-0.5 * ((v - 5.1) / (0.3 / 2.355)) ** 2)
    T[np.argmin(np.abs(v - 12.0))] = -0.7  # one negative channel at +12 km/s
    win = {"freq_MHz": freq, "T_K": T, "rms_K": 0.05}
    fine = model.make_tokens([win], _one_line(f0), cfg, torch.float64)["fine"][0].numpy()
    assert fine.shape == (model.N_FINE, 160)
    edges = np.linspace(-20.0, 20.0, 161)
    j_peak = np.searchsorted(edges, v[np.argmax(T)]) - 1
    assert fine[0, j_peak] == pytest.approx(np.arcsinh(T.max()), rel=1e-12)
    assert np.argmax(fine[0]) == j_peak
    j_neg = np.searchsorted(edges, 12.0) - 1
    assert fine[1, j_neg] == pytest.approx(np.arcsinh(-0.7), rel=1e-12)
    inside = (edges[1:] <= 30.0) & (edges[:-1] >= -10.0)  # bins wholly in the window
    assert np.all(fine[2][inside] == 1.0) and np.all(fine[2][edges[1:] < -10.5] == 0.0)
    flipped = {"freq_MHz": freq[::-1], "T_K": T[::-1], "rms_K": 0.05}
    fine2 = model.make_tokens([flipped], _one_line(f0), cfg, torch.float64)["fine"][0].numpy()
    np.testing.assert_array_equal(fine, fine2)


def test_fine_patch_fills_bins_wider_than_channels_and_masks_blanks():
    """Channels of 1 km/s leave most 0.25 km/s bins empty: those get the interpolated value;
    blanked (NaN) channels never enter a bin."""
    cfg = dataclasses.replace(TINY, fine_len=40, fine_width_kms=10.0)  # 0.5 km/s bins
    f0 = 100_000.0
    freq = np.linspace(f0 * (1 - 15 / C_KMS), f0 * (1 + 15 / C_KMS), 31)  # 1 km/s channels
    v = C_KMS * (1 - freq / f0)
    T = 0.01 * v
    T[np.argmin(np.abs(v - 3.0))] = np.nan
    fine = model.make_tokens([(freq, T, 0.05)], _one_line(f0), cfg, torch.float64)["fine"][0]
    fine = fine.numpy()
    centres = -10.0 + 0.5 * (np.arange(40) + 0.5)
    assert np.all(np.isfinite(fine))
    far = np.abs(centres - 3.0) > 1.5
    np.testing.assert_allclose(np.sinh(fine[0][far]), 0.01 * centres[far], atol=0.0051)
    assert np.all(fine[2][far] == 1.0) and fine[2][np.argmin(np.abs(centres - 3.0))] < 1.0


def test_upgrade_keeps_an_old_policy_s_proposals(tmp_path):
    """A policy file written before the fine patch loads with fine_len 0 and, upgraded to a
    network with the fine patch, gives the same log-probabilities (zero-initialised embedding)."""
    old_cfg = dataclasses.replace(TINY, fine_len=0)
    old = model.PolicyNet(old_cfg).double()
    path = tmp_path / "old.pt"
    torch.save({"config": {k: v for k, v in model.dataclasses.asdict(old_cfg).items()
                           if k not in ("fine_len", "fine_width_kms")},
                "state_dict": old.state_dict()}, path)  # fmt: skip
    net, cfg = model.load_policy(path)
    assert cfg.fine_len == 0 and not any(".fine" in k for k in net.state_dict())
    new_cfg = dataclasses.replace(TINY, fine_len=24, fine_width_kms=6.0)
    new = model.upgrade(net.double(), new_cfg).double()
    lines = _lines()
    wins = _windows(lines)
    b_old = model.collate([model.make_tokens(wins, lines, cfg, torch.float64)])
    b_new = model.collate([model.make_tokens(wins, lines, new_cfg, torch.float64)])
    assert "fine" not in b_old and b_new["fine"].shape[-2:] == (model.N_FINE, 24)
    u = torch.rand(4, 1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(new.log_prob(u, b_new), net.log_prob(u, b_old), rtol=0, atol=0)
    with pytest.raises(ValueError, match="differ"):
        model.upgrade(net, dataclasses.replace(new_cfg, d_model=32))
