"""Velocity stacking: a matched filter that proposes starts for a fit without a network (ours).

For each template (T_ex, FWHM) of a small grid, with N_tot chosen so the strongest line in
reach is optically thin (peak tau TAU_THIN), the model M_j of window j is computed once at
v_off = 0 on a grid n_over times finer than the window's channels. A shift v_off moves every
line by delta = nu_c v_off / c (nu_c the window centre, mu_t = nu_t (1 - v_off / c)), and the
channel average over [f_i + delta +- dnu / 2] is the mean of n_over consecutive fine bins, so
the channel model at every lag L = delta / h (h = dnu / n_over) is one correlation away:

    c(v) = sum_j sum_i w_ij T_ij M_j(f_i + delta_j(v)),   d(v) = sum_j sum_i w_ij M_j(...)^2,
    w = 1 / rms^2,   a(v) = c / d (least-squares scale),   Delta chi2(v) = c^2 / d  (a > 0),

the matched-filter (likelihood-ratio) statistic of a thin line pattern of unknown amplitude,
summed over the windows on a common v_off grid. The best lag of each template gives a start:
eta N_tot = a eta_t N_t (thin lines scale with eta N), put into eta first, the rest into N_tot.
Channels are taken as evenly spaced in frequency (true of ALMA and single-dish windows); the
starts are then evaluated and refined with the exact Problem. Cost: each template's fine model
is counted as n_over model runs (it has n_over times the channels of a window model). The fine
models do not depend on the data: a process keeps the channel means of its last CACHE_SIZE
windows (MEANS_CACHE), so the pixels of a cube run them once per process; each problem is still
charged for them, so that a pixel's nfev does not depend on the pixels fitted before it.

    import numpy as np, stack
    U, L = stack.candidates(problem)  # (n, n_free) starts, best first, losses; nfev counted
"""

import threading
from collections import OrderedDict

import numpy as np

import lte
from problem import to_unit

TAU_THIN = 0.1  # peak opacity of the template's strongest line: thin, so T ~ eta N
N_T_EX, N_FWHM = 3, 5  # template grid: geometric points inside the box (ends excluded)
LAG_STEP_KMS = 0.25  # fine-grid step target: well below the narrowest FWHM of the grid
CACHE_SIZE = 4  # windows whose template channel means a process keeps (issue 10)
# The one piece of state here: the template channel means of the last CACHE_SIZE windows,
# keyed on every input they depend on, so that a cube's pixels (same windows, lines and
# templates, other data) compute them once per process instead of once per pixel.
MEANS_CACHE: OrderedDict = OrderedDict()
CACHE_LOCK = threading.Lock()  # a Dask worker may fit pixels in several threads


def _grid(box: dict, i: int, n: int) -> np.ndarray:
    """n values of parameter i (log in the box) inside its bounds, or the fixed value."""
    if not box["free"][i]:
        return np.array([box["x_fix"][i]])
    return np.logspace(box["q_lo"][i], box["q_hi"][i], n + 2)[1:-1]


def templates(problem, k: int) -> np.ndarray:
    """Template parameters (n_t, 5) of molecule k: a (T_ex, FWHM) grid, v_off = 0, eta at its
    fixed value or ETA_MAX, N_tot fixed or scaled so the peak opacity is TAU_THIN."""
    box = problem.box
    T, W = np.meshgrid(_grid(box, 5 * k + 1, N_T_EX), _grid(box, 5 * k + 3, N_FWHM))
    P = np.zeros((T.size, 5))
    P[:, 1], P[:, 3] = T.ravel(), W.ravel()
    P[:, 0] = box["x_fix"][5 * k] if not box["free"][5 * k] else 10 ** box["q_hi"][5 * k]
    P[:, 2] = 1e15 if box["free"][5 * k + 2] else box["x_fix"][5 * k + 2]
    if box["free"][5 * k + 2]:
        tau = np.zeros(len(P))
        for w, lines in zip(problem.windows, problem.lines):
            if lines[k].freq_MHz.size:
                tau = np.maximum(tau, lte.peak_opacity(w.freq_MHz, lines[k], P))
        scale = np.where(tau > 0, TAU_THIN / np.maximum(tau, 1e-300), 1.0)
        lo, hi = 10 ** box["q_lo"][5 * k + 2], 10 ** box["q_hi"][5 * k + 2]
        P[:, 2] = np.clip(P[:, 2] * scale, lo, hi)
    return P


def _channel_means(f: np.ndarray, lines, P: np.ndarray, T_bg: float, v_max: float):
    """(B, B^2 (n_t, F), K, n_over, h, nu_c) of one window: each template's channel means B at
    every fine start (lags to +-v_max), from MEANS_CACHE when the same inputs were seen.

    B depends on the window's frequencies, the lines, the templates, T_bg and v_max only, not
    on the data, so the pixels of a cube share it."""
    key = (f.tobytes(), _lines_key(lines), P.shape, P.tobytes(), float(T_bg), float(v_max))
    with CACHE_LOCK:
        if key in MEANS_CACHE:
            MEANS_CACHE.move_to_end(key)
            return MEANS_CACHE[key]
    dnu, nu_c = (f[-1] - f[0]) / (f.size - 1), 0.5 * (f[0] + f[-1])
    n_over = int(np.clip(np.ceil(dnu / nu_c * lte.C_KMS / LAG_STEP_KMS), 1, 8))
    h = dnu / n_over
    K = int(np.ceil(v_max * nu_c / lte.C_KMS / h))
    fine = f[0] - dnu / 2 - K * h + (np.arange(f.size * n_over + 2 * K) + 0.5) * h
    M = lte.spectrum(fine, lines, P, T_bg)  # (n_t, F): counted by the caller
    csum = np.concatenate([np.zeros((len(P), 1)), np.cumsum(M, axis=1)], axis=1)
    B = (csum[:, n_over:] - csum[:, :-n_over]) / n_over  # channel means at every fine start
    B2 = B * B
    B.flags.writeable = B2.flags.writeable = False  # shared by every caller with these inputs
    value = (B, B2, K, n_over, h, nu_c)
    with CACHE_LOCK:
        MEANS_CACHE[key] = value
        while len(MEANS_CACHE) > CACHE_SIZE:
            MEANS_CACHE.popitem(last=False)  # least recently used
    return value


def _lines_key(lines) -> tuple:
    """What of a line list lte.spectrum reads, as bytes (a cache key)."""
    arrays = (lines.freq_MHz, lines.A_s, lines.g_u, lines.E_low_K, lines.Q_T_K, lines.log10_Q)
    return (lines.name,) + tuple(np.asarray(a, dtype=float).tobytes() for a in arrays)


def _window_stats(w, lines, P: np.ndarray, v_max: float):
    """(v (n_lag,), c (n_t, n_lag), d (n_t, n_lag), n_over) of one window, lags to +-v_max."""
    f = w.freq_MHz
    T_bg = float(np.mean(w.T_bg_K))
    B, B2, K, n_over, h, nu_c = _channel_means(f, lines, P, T_bg, v_max)
    wgt = 1.0 / np.broadcast_to(w.rms_K, f.shape) ** 2
    c = np.einsum("tlc,c->tl", _lagged(B, K, n_over, f.size), wgt * w.T_obs_K)  # every lag
    d = np.einsum("tlc,c->tl", _lagged(B2, K, n_over, f.size), wgt)  # at once
    lags = np.arange(-K, K + 1)
    return lags * h / nu_c * lte.C_KMS, c, d, n_over


def _lagged(A: np.ndarray, K: int, n_over: int, C: int) -> np.ndarray:
    """Read-only view (n_t, 2K + 1, C) of A (n_t, F): [t, K + L, i] = A[t, K + L + i n_over],
    what channel i reads at lag L (no copy)."""
    assert A.shape[1] == (C - 1) * n_over + 2 * K + 1, (A.shape, C, n_over, K)  # in bounds
    s_t, s_f = A.strides
    return np.lib.stride_tricks.as_strided(A, (len(A), 2 * K + 1, C), (s_t, s_f, s_f * n_over),
                                           writeable=False)  # fmt: skip


def matched_filter(problem, k: int):
    """Delta chi2 of molecule k's templates over v_off, summed over windows (see module doc).

    Returns:
        P (n_t, 5) templates, v (n_v,) km/s, c and d (n_t, n_v); adds the model runs to
        problem.nfev.
    """
    box, i = problem.box, 5 * k + 4
    v_lo, v_hi = (box["q_lo"][i], box["q_hi"][i]) if box["free"][i] else (box["x_fix"][i],) * 2
    P = templates(problem, k)
    v = np.arange(v_lo, v_hi + 1e-9, 0.05) if v_hi > v_lo else np.array([v_lo])
    c, d, n_over_max = np.zeros((len(P), v.size)), np.zeros((len(P), v.size)), 0
    for w, lines in zip(problem.windows, problem.lines):
        if lines[k].freq_MHz.size == 0:
            continue
        v_j, c_j, d_j, n_over = _window_stats(w, lines[k], P, max(abs(v_lo), abs(v_hi)))
        # a line at v_off sits where the v_off = 0 pattern is read at +delta: lag = +v
        c += np.stack([np.interp(v, v_j, row) for row in c_j])
        d += np.stack([np.interp(v, v_j, row) for row in d_j])
        n_over_max = max(n_over_max, n_over)
    # Each fine model costs n_over window models. They are counted whether run here or taken
    # from MEANS_CACHE: a pixel's nfev (a map of fit_cube) must not depend on which pixels its
    # worker fitted before (the output is identical for any worker count).
    problem.nfev += len(P) * n_over_max
    return P, v, c, d


def candidates(problem, n_per_template: int = 1):
    """Unit-cube starts from the matched filter, evaluated with the Problem (counted).

    Each template's best v_off (largest Delta chi2 with a > 0) becomes one start per molecule;
    with k molecules the i-th best of each are combined (each filtered alone).

    Returns:
        U (n, n_free) sorted by loss, L (n,) their losses.
    """
    box = problem.box
    per_mol = []
    for k in range(len(problem.molecules)):
        P, v, c, d = matched_filter(problem, k)
        with np.errstate(divide="ignore", invalid="ignore"):
            a = np.where(d > 0, c / d, 0.0)
            score = np.where(a > 0, c**2 / np.where(d > 0, d, 1.0), 0.0)
        best = np.argmax(score, axis=1)  # (n_t,)
        order = np.argsort(-score[np.arange(len(P)), best], kind="stable")
        rows = []
        for t in order:
            p = P[t].copy()
            p[4] = v[best[t]]
            rows.append(_set_amplitude(p, max(a[t, best[t]], 1e-6), box, k))
        per_mol.append(np.array(rows))
    n = min(len(r) for r in per_mol)
    X = np.concatenate([r[:n] for r in per_mol], axis=1)  # (n, 5 k)
    U = np.clip(to_unit(X, box), 0.0, 1.0)
    U = np.unique(U, axis=0)
    L = problem(U)
    order = np.argsort(L, kind="stable")
    return U[order], L[order]


def _set_amplitude(p: np.ndarray, a: float, box: dict, k: int) -> np.ndarray:
    """Template parameters p (5,) scaled in eta N_tot by a: eta first, the rest into N_tot,
    each within its bounds where free (thin lines: T ~ eta N_tot)."""
    lo, hi = 10 ** box["q_lo"][5 * k : 5 * k + 5], 10 ** box["q_hi"][5 * k : 5 * k + 5]
    rest = a
    if box["free"][5 * k]:
        eta = float(np.clip(p[0] * a, lo[0], hi[0]))
        rest, p[0] = p[0] * a / eta, eta
    if box["free"][5 * k + 2]:
        p[2] = float(np.clip(p[2] * rest, lo[2], hi[2]))
    return p
