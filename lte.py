"""The LTE line model (docs/method.md §2; XCLASS, Möller et al. 2017): the brightness of one
molecule in one spectral window for a batch of parameter sets, each channel the average of the
intensity over the channel.

Read top to bottom: constants; J(nu, T); the integrated opacity tau_t; `reference_spectrum`, the
equations as written (a brute-force channel average); and the fast kernel, `spectrum` =
`render(line_layout(...))`, tested against it. `render(..., channels=)` evaluates only the
channels the lines reach (`touched_channels`), with the same values as the full window.
Molecules come from catalogs.py (`load_molecule`, re-exported here).

    import lte
    mol = lte.load_molecule("CH3OH")                       # bundled CDMS 032504
    T_K = lte.spectrum(freq_MHz, mol, [[0.5, 150.0, 1e17, 2.0, 0.0]])  # (1, C)

Parameters (the last axis of `params`): eta, T_ex_K, N_tot_cm2, fwhm_kms, v_off_kms.
"""

import math

import numpy as np

from catalogs import (  # noqa: F401  (re-exported: lte.load_molecule is the public API)
    H_OVER_K_K_PER_MHZ,
    Molecule,
    load_molecule,
    log10_partition,
    make_molecule,
    select_lines,
)
from losses import runs_of  # the runs of a sorted channel list, as the loss reads them
from subchannels import (  # noqa: F401  (re-exported: lte.keep_freed_memory)
    N_SIGMA_MAX,
    average_channels,
    keep_freed_memory,
    plan,
)

C_KMS = 299792.458  # speed of light [km/s]
T_CMB_K = 2.726
C2_OVER_8PI = (
    35.7603  # c^2/(8 pi) for N [cm^-2], A [s^-1], nu [MHz] -> tau [MHz] (docs/method.md §2)
)
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
PARAM_NAMES = ("eta", "T_ex_K", "N_tot_cm2", "fwhm_kms", "v_off_kms")


def planck_J_K(xp, freq_MHz, T_K):
    """Radiation temperature J(nu, T) = (h nu/k) / (exp(h nu/k T) - 1) [K] (docs/method.md §2)."""
    h_nu_k = H_OVER_K_K_PER_MHZ * freq_MHz
    return h_nu_k / xp.expm1(h_nu_k / T_K)


# --- the forward model (docs/method.md §2) ---


_LIMITS = np.array([(0.0, 1.0), (1e-3, 1e5), (0.0, 1e30), (1e-4, 1e4), (-C_KMS / 2, C_KMS / 2)])
_LIMITS_LIST = _LIMITS.tolist()


def _check_params(params) -> None:
    """Raise ValueError naming the first bad value in params (..., 5)."""
    p = np.asarray(params, dtype=float)
    if p.ndim == 0 or p.shape[-1] != 5:
        raise ValueError(f"params must have shape (..., 5) {PARAM_NAMES}, got {p.shape}")
    if p.size == 5 and all(a <= v <= b for v, (a, b) in zip(p.ravel().tolist(), _LIMITS_LIST)):
        return  # one set, in python floats (False for NaN)
    lo, hi = _LIMITS[:, 0], _LIMITS[:, 1]
    if (p >= lo).all() and (p <= hi).all():  # also False for NaN: every good case in 2 tests
        return
    for k in range(5):
        col = p[..., k]
        bad = ~np.isfinite(col) | (col < lo[k]) | (col > hi[k])
        if bad.any():
            value = col[bad].ravel()[0]
            raise ValueError(f"{PARAM_NAMES[k]}={value} out of range; expected {lo[k]} to {hi[k]}")


def _channel_edges(freq_MHz: np.ndarray) -> np.ndarray:
    """Edges (C+1,) of channels with centres freq_MHz (C,) ascending: midpoints, ends mirrored."""
    if freq_MHz.size == 1:
        raise ValueError("a window needs at least 2 channels to define the channel width")
    edges = np.empty(freq_MHz.size + 1)
    mid = np.add(freq_MHz[1:], freq_MHz[:-1], out=edges[1:-1])
    mid *= 0.5
    edges[0], edges[-1] = 2 * freq_MHz[0] - mid[0], 2 * freq_MHz[-1] - mid[-1]
    return edges


def reach_kms(v_off_max_kms: float, fwhm_max_kms: float) -> float:
    """How far (km/s) beyond a window a line centre can lie and still touch it: the kernel
    keeps a line's opacity out to N_SIGMA_MAX sigma of a centre shifted by up to v_off_max."""
    return float(v_off_max_kms + N_SIGMA_MAX * fwhm_max_kms / FWHM_PER_SIGMA)


def _integrated_tau(lines: Molecule, T_ex, N):
    """tau_t [MHz] of each line (see `spectrum`), T_ex and N (B, 1) -> (B, L), or floats -> (L,)."""
    nu, A, gu, El = lines.freq_MHz, lines.A_s, lines.g_u, lines.E_low_K
    Q = np.power(10.0, log10_partition(np, T_ex, lines.Q_T_K, lines.log10_Q))
    boltz = np.exp(-El / T_ex) * -np.expm1(-H_OVER_K_K_PER_MHZ * nu / T_ex)
    return C2_OVER_8PI * N * A * gu * boltz / (Q * nu**2)


def line_layout(freq_MHz, mol: Molecule, params) -> dict:
    """Where each line of `mol` falls on one window's channels, for a batch of parameters.

    The first half of `spectrum`: integrated opacity tau_t, centre mu_t and width sigma_t of
    each line (docs/method.md §2), in channel-index units of the window sorted ascending (channel i
    spans [i, i+1)), the sub-channel plan of each row, and the channels each line reaches.

    Args:
        freq_MHz: (C,) rest-frame channel centres, ascending (C >= 2).
        mol: the molecule; params: (B, 5) as in `spectrum`.
    Returns:
        dict: f (C,) centres, P (B, 5), x, s, tau (B, L) line centre, sigma and integrated
        opacity [channels] of the L lines that reach the window in some row (L = 0: none),
        n_sub, K (B,) ints, simpson (B,) bool; reach: the first and last channel (B, L) of the
        2K+1 sub-channels around each line's centre, unclipped (what
        subchannels.average_channels touches), and touch (B, L): whether they meet the window.
    """
    f = np.asarray(freq_MHz, dtype=float)
    P = np.asarray(params, dtype=float)
    edges = _channel_edges(f)
    f0, C = edges[0], f.size  # centres enter as offsets from f0, which keeps sub-kHz precision
    if len(P) == 1:  # one row: python floats, the same operations as on (1, 1) arrays
        eta, T_ex, N, fwhm, v_off = P[0].tolist()
        reach = reach_kms(abs(v_off), fwhm)
    else:
        eta, T_ex, N, fwhm, v_off = (P[:, k : k + 1] for k in range(5))  # each (B, 1)
        reach = reach_kms(np.abs(v_off).max(), fwhm.max())
    lines = select_lines(mol, f0 * (1 - reach / C_KMS), edges[-1] * (1 + reach / C_KMS))
    nu = lines.freq_MHz
    tau_int = _integrated_tau(lines, T_ex, N)  # (B, L) [MHz]
    mu = (nu - f0) - nu * v_off / C_KMS  # mu_t - f0 = nu_t (1 - v_off/c) - f0, (B, L) [MHz]
    sigma = fwhm / FWHM_PER_SIGMA * (nu / C_KMS) * (1.0 - v_off / C_KMS)  # (B, L) [MHz]
    i = np.minimum(np.maximum(edges.searchsorted(mu + f0) - 1, 0), C - 1)  # its channel
    e_i = edges[i]
    w = edges[i + 1] - e_i  # channel width
    x = i + (mu - (e_i - f0)) / w  # (B, L) centre in channel-index units
    s, tau = sigma / w, tau_int / w  # [channels]
    if len(P) == 1:
        x, s, tau = x[None], s[None], tau[None]
    out = dict(f=f, P=P, x=x, s=s, tau=tau, L=0)
    if nu.size == 0:
        return out
    n_sub, K, simpson = plan(s, tau / (math.sqrt(2 * math.pi) * s))
    n, k = (int(n_sub[0]), int(K[0])) if len(P) == 1 else (n_sub[:, None], K[:, None])
    j0 = np.floor(x * n)  # centre sub-channel, (B, L)
    lo, hi = np.floor_divide(j0 - k, n), np.floor_divide(j0 + k, n)
    touch = (hi >= 0) & (lo <= C - 1)
    cols = (touch[0] if len(P) == 1 else np.logical_or.reduce(touch, axis=0)).nonzero()[0]
    if cols.size < nu.size:  # lines that reach no row's window: left out
        x, s, tau, lo, hi, touch = (a[:, cols] for a in (x, s, tau, lo, hi, touch))
    out.update(x=x, s=s, tau=tau, L=cols.size, n_sub=n_sub, K=K, simpson=simpson)
    out.update(reach=(lo, hi), touch=touch)
    return out


def touched_channels(layout: dict) -> tuple[np.ndarray, np.ndarray]:
    """First and last channel (inclusive) each line of each row can change, for the lines
    that touch the window at all: (lo, hi) flat int arrays. Outside them the model is 0."""
    if layout["L"] == 0:
        return np.empty(0, dtype=int), np.empty(0, dtype=int)
    lo, hi = layout["reach"]
    if len(lo) > 1:  # a line can touch the window in some rows only
        lo, hi = lo[layout["touch"]], hi[layout["touch"]]
    C = layout["f"].size
    return np.maximum(lo, 0).astype(int).ravel(), np.minimum(hi, C - 1).astype(int).ravel()


def covering(lo: np.ndarray, hi: np.ndarray, n_chan: int, pad: int = 0) -> np.ndarray:
    """Sorted channels of the union of the intervals [lo - pad, hi + pad] (inclusive) within
    0..n_chan-1, in O(number of intervals + channels covered)."""
    if lo.size == 0:
        return np.empty(0, dtype=int)
    return _covering_runs(lo, hi, n_chan, pad)[0]


def _covering_runs(lo, hi, n_chan, pad=0):
    """`covering` (n,), and the first channel and shift (channel - position) of each run."""
    order = lo.argsort(kind="stable")
    lo, hi = np.maximum(lo[order] - pad, 0), np.minimum(hi[order] + pad, n_chan - 1)
    reach = np.maximum.accumulate(hi)
    new = np.empty(lo.size, dtype=bool)
    new[0] = True
    np.greater(lo[1:], reach[:-1] + 1, out=new[1:])  # a gap: a new run starts
    start = lo[new]
    size = np.maximum.reduceat(hi, new.nonzero()[0]) - start + 1
    end = size.cumsum()  # position after each run in the covering
    shift = start - end + size
    return shift.repeat(size) + np.arange(end[-1]), start, shift


def render(layout: dict, T_bg_K=0.0, cmb: bool = True, channels=None) -> np.ndarray:
    """The second half of `spectrum`: channel-averaged brightness from a line_layout.

    Args:
        layout: from line_layout. T_bg_K: scalar or (C,) [K]. cmb: subtract J(nu, T_CMB).
        channels: None for every channel, or sorted channel indices (n,) holding every channel
            that touched_channels gives (the model is 0 elsewhere); the values there are those
            of the full window, computed at the cost of the n channels only.
    Returns:
        (B, C) or (B, n) brightness temperature [K].
    """
    if channels is None:
        return _render(layout, T_bg_K, cmb, np.arange(layout["f"].size))
    idx = np.asarray(channels, dtype=int)
    starts, shift = runs_of(idx)  # runs of consecutive channels and their shifts
    return _render(layout, T_bg_K, cmb, idx, (idx[starts], shift))


def _render(layout: dict, T_bg_K, cmb: bool, idx: np.ndarray, runs=None) -> np.ndarray:
    """`render` on the channels idx; runs: None (idx is every channel) or the first channel and
    shift (channel - position in idx) of each run of consecutive channels in idx."""
    f, P, C = layout["f"], layout["P"], layout["f"].size
    if layout["L"] == 0 or idx.size == 0:
        return np.zeros((len(P), idx.size))
    x, n_sub, K, simpson = layout["x"], layout["n_sub"], layout["K"], layout["simpson"]
    if runs is not None:  # move each line by a whole number of channels onto `idx`
        lo, hi = layout["reach"]
        lo = np.maximum(lo, 0) if len(P) == 1 else np.minimum(np.maximum(lo, 0), C - 1)
        x = x - runs[1][np.maximum(runs[0].searchsorted(lo, side="right") - 1, 0)]
        if len(P) > 1:  # a line that touches nothing in its row: into the padding below
            away = ~layout["touch"] | (hi < idx[0])  # channel 0, centred on its sub-channel
            x = np.where(away, (-1.0 - K[:, None]) / n_sub[:, None], x)  # (no exp underflow)
    eta, T_ex = P[0, :2].tolist() if len(P) == 1 else (P[:, 0:1], P[:, 1:2])
    f_idx = f[idx]
    dJ = planck_J_K(np, f_idx, T_ex)  # (B, n)
    if cmb:
        dJ -= planck_J_K(np, f_idx, T_CMB_K)
    T_bg = np.asarray(T_bg_K, dtype=float)
    amp = eta * (dJ - (T_bg if T_bg.ndim == 0 else np.broadcast_to(T_bg, f.shape)[idx]))
    s_all, tau_all = layout["s"], layout["tau"]
    if len(P) == 1:  # one row, one group
        return average_channels(idx.size, int(n_sub[0]), int(K[0]), x, s_all, tau_all, amp,
                                 bool(simpson[0]))  # fmt: skip
    out = np.zeros((len(P), idx.size))
    group = (n_sub.astype(np.int64) << 32) + (K.astype(np.int64) << 1) + simpson
    for g in np.unique(group):
        rows = (group == g).nonzero()[0]
        n, k, simp = int(n_sub[rows[0]]), int(K[rows[0]]), bool(simpson[rows[0]])
        step = max(1, int(3e5 // (idx.size * n + 4 * (k + 1) * max(layout["L"], 1))))
        for a in range(0, len(rows), step):
            r = slice(None) if len(rows) == len(group) <= step else rows[a : a + step]
            out[r] = average_channels(idx.size, n, k, x[r], s_all[r], tau_all[r], amp[r], simp)
    return out


def spectrum(freq_MHz, mol: Molecule, params, T_bg_K=0.0, cmb: bool = True):
    """LTE brightness of one molecule in one window, channel-averaged (docs/method.md §2, XCLASS).

    tau_t = (c^2/8pi) N A g_u exp(-E_l/T_ex) (1 - exp(-h nu/k T_ex)) / (Q(T_ex) nu^2)  [MHz]
    T(nu) = eta [J(nu, T_ex) - J(nu, T_CMB) - T_bg] (1 - exp(-sum_t tau_t G(nu; mu_t, sigma_t)))
    with mu_t = nu_t (1 - v_off/c), sigma_t = fwhm/(2 sqrt(2 ln 2)) mu_t/c; each channel records
    the average of T(nu) over its width (the intensity is averaged, not the opacity). Lines
    whose centre lies outside the window still contribute their wings.

    Args:
        freq_MHz: (C,) rest-frame channel centres of one window, ascending or descending,
            C >= 2; channel widths follow from the spacing.
        mol: the molecule (lines out of reach of the window are skipped).
        params: (..., 5) eta, T_ex [K], N_tot [cm^-2], FWHM [km/s], v_off [km/s].
        T_bg_K: continuum brightness under the line [K], scalar or (C,).
        cmb: subtract J(nu, T_CMB) (docs/method.md §2).
    Returns:
        (..., C) brightness temperature [K].
    Raises:
        ValueError: empty or non-finite frequencies, or parameters out of range.
    """
    params = np.asarray(params, dtype=float)
    freq = np.asarray(freq_MHz, dtype=float)
    if freq.ndim != 1 or freq.size == 0 or not np.isfinite(freq).all():
        raise ValueError(f"freq_MHz must be a non-empty 1-D finite array, got shape {freq.shape}")
    _check_params(params)
    flip = freq[-1] < freq[0]
    T_bg = np.asarray(T_bg_K, dtype=float)
    if T_bg.ndim:  # a continuum per channel
        T_bg = np.broadcast_to(T_bg, freq.shape)[::-1] if flip else T_bg
    f = freq[::-1].copy() if flip else freq
    layout = line_layout(f, mol, params.reshape(-1, 5))
    out = np.zeros((len(layout["P"]), f.size))
    if layout["L"]:  # the model is 0 on every channel the lines do not reach
        idx, start, shift = _covering_runs(*touched_channels(layout), f.size)
        T = _render(layout, T_bg, cmb, idx, (start, shift))
        if len(T) == 1:
            out[0][idx] = T[0]  # a 1-D assignment: twice as fast as out[:, idx]
        else:
            out[:, idx] = T
    return (out[:, ::-1] if flip else out).reshape(*params.shape[:-1], freq.size)


def reference_spectrum(
    freq_MHz, mol: Molecule, params, T_bg_K=0.0, cmb: bool = True, n_sub: int = 400
) -> np.ndarray:
    """docs/method.md §2 as written, for one parameter set: slow, for reading and for tests.

    tau(nu) = sum_t tau_t G(nu; mu_t, sigma_t) on n_sub points per channel, then
    T(nu) = eta [J(nu, T_ex) - J(nu, T_CMB) - T_bg] (1 - exp(-tau(nu))) averaged over each
    channel. `spectrum` computes the same thing fast (and agrees to 1e-3 of the peak).

    Args: freq_MHz (C,) ascending; params (5,); T_bg_K scalar. Returns: (C,) [K].
    """
    eta, T_ex, N, fwhm, v_off = np.asarray(params, dtype=float)
    edges = _channel_edges(np.asarray(freq_MHz, dtype=float))
    nu = edges[:-1, None] + np.diff(edges)[:, None] * (np.arange(n_sub) + 0.5) / n_sub  # (C, S)
    tau_t = _integrated_tau(mol, np.array([[T_ex]]), np.array([[N]]))[0]  # (L,) [MHz]
    mu = mol.freq_MHz * (1 - v_off / C_KMS)  # line centres
    sigma = fwhm / FWHM_PER_SIGMA * mu / C_KMS  # line widths
    tau = np.zeros_like(nu)
    for t, m, s in zip(tau_t, mu, sigma):
        tau += t * np.exp(-0.5 * ((nu - m) / s) ** 2) / (math.sqrt(2 * math.pi) * s)
    dJ = planck_J_K(np, nu, T_ex) - cmb * planck_J_K(np, nu, T_CMB_K) - T_bg_K
    return (eta * dJ * -np.expm1(-tau)).mean(axis=1)


def peak_opacity(freq_MHz, mol: Molecule, params) -> np.ndarray:
    """Largest line-centre opacity tau_0 = tau_t / (sqrt(2 pi) sigma_t) among the molecule's
    lines whose centre falls in the window (rest frame; tau_t, sigma_t as in `spectrum`).

    A line, not a blend: overlapping lines add their opacities in `spectrum`. tau_0 < 1 means
    optically thin, where the brightness depends on eta and N_tot only through their product.

    Args:
        freq_MHz: (C,) rest-frame channel centres of the window.
        mol: the molecule.
        params: (..., 5) as in `spectrum`.
    Returns:
        (...) tau_0, 0 where no line falls in the window.
    """
    P = np.asarray(params, dtype=float).reshape(-1, 5)
    _check_params(P)
    freq = np.asarray(freq_MHz, dtype=float)
    v_max = np.abs(P[:, 4]).max()  # centres move by v_off: keep every line that can land inside
    lines = select_lines(mol, freq.min() * (1 - v_max / C_KMS), freq.max() * (1 + v_max / C_KMS))
    if lines.freq_MHz.size == 0:
        return np.zeros(np.shape(params)[:-1])
    tau_int = _integrated_tau(lines, P[:, 1:2], P[:, 2:3])  # (B, L) [MHz]
    mu = lines.freq_MHz * (1.0 - P[:, 4:5] / C_KMS)  # (B, L) line centres
    sigma = P[:, 3:4] / FWHM_PER_SIGMA * (lines.freq_MHz / C_KMS) * (1.0 - P[:, 4:5] / C_KMS)
    tau_0 = np.where((mu >= freq.min()) & (mu <= freq.max()), tau_int, 0.0)
    tau_0 = tau_0 / (math.sqrt(2 * math.pi) * sigma)
    return tau_0.max(axis=-1).reshape(np.shape(params)[:-1])
