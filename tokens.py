"""Tokens of the Spectuner-D1 policy (docs/method.md §5): one molecule observed in one or more
spectral windows, as the arrays the network reads (numpy in, torch out).

One token per transition in reach of the observed windows, strongest first up to max_tokens:
six standardised spectroscopic features, a patch of the observed spectrum on a fixed velocity
grid around the line (7 channels), and, when cfg.fine_len > 0, a fine patch of 3 channels in
narrow velocity bins. `collate` pads a list of them to one batch; model.py encodes the batch.
"method §N" is a section of docs/method.md.

`cfg` is a model.ModelConfig; this module reads only its token fields (patch_len, v_width_kms,
fine_len, fine_width_kms, max_tokens, T_proxy_K, T_scale_K, peak_nsigma, Q_temps_K), so any
object with them will do.

Shape letters: B batch, N transition tokens, L patch length, L_f fine-patch bins, C channels of
an observed window, n_T partition-function temperatures.

Leaf module: torch, numpy and the standard library only; importing it does nothing.

    tok = make_tokens([{"freq_MHz": f, "T_K": T, "rms_K": 0.05}], lines, cfg)
    batch = collate([tok])   # spec (1, N, 6), patch (1, N, 7, L), fine, logq, mask
"""

import math

import numpy as np
import torch

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


def _select(lines: dict, wins: list, cfg) -> np.ndarray:
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


def _patches(freq_t: np.ndarray, wins: list, cfg) -> np.ndarray:
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


def _fine_patches(freq_t: np.ndarray, wins: list, cfg) -> np.ndarray:
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


def make_tokens(windows: list, lines: dict, cfg, dtype=torch.float32) -> dict:
    """Tokens of one molecule observed in one or several windows (method §5).

    Args:
        windows: dicts with keys freq_MHz (C,) rest-frame channel centres (either order), T_K (C,)
            [K] (or T_obs_K; NaN = blanked), rms_K (float or (C,)), T_bg_K (float, default 0),
            beam_arcsec (float or None -> 0); or tuples in that order (e.g. spectuner.Window
            after shifting its frequencies to the rest frame).
        lines: rest-frame numpy arrays freq_MHz, A_s [s^-1], g_u, E_low_K, E_up_K (all (n_lines,))
            and log10_Q, shape (len(cfg.Q_temps_K),), log10 Q at cfg.Q_temps_K.
        cfg: a model.ModelConfig (its token fields).
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
