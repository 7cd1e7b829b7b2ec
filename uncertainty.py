"""How well a fit is determined: chi2 polish, 1-sigma errors, faces of the box, limits.

After the optimiser of a fit (spectuner.fit_spectrum): the pm optimum refined by least squares
on the channels its model explains (issue 14; docs/method.md §4, §8), the Gauss-Newton 1-sigma
errors in physical units with the notes where there is none (issue 3), the parameters that end
at a face of the box, and the detection test and N_tot upper limit along the chi2 profile of
each molecule (issue 15). fit_cube uses residuals_at and detect_and_limit for its limit maps.

    import uncertainty
    det = uncertainty.detect_and_limit(problem.resid_x, X, 0, box)  # dchi2, N_tot_upper, ...
"""

from __future__ import annotations

import numpy as np

import lte
from losses import PEAK_SIGMA
from optimise import bound_flags, gauss_newton_errors, profile_crossing, refine_least_squares
from problem import ETA_MAX, PARAM_NAMES, Problem, make_box, to_physical

BLENDED = 0.05  # more unexplained channels than this: the errors are flagged as lower bounds;
# in 100 forest fits (bench.py coverage --kind forest) the median was 22 % and 1-sigma coverage
# 36-53 %, in 100 clean ones the median was 0 (docs/benchmarks.md §10)
FOREST_DROP = 0.5  # chi2 refinement not applied when more channels than this are unexplained:
# on the IRAS 16293-2422 B windows (57 % unexplained) it narrowed CH3OH from the pm fit's
# 0.62 km/s to 0.49 km/s, below the 0.7-1.4 km/s of the real lines, by dropping blended wings
NEARLY_THIN_TAU = 0.2  # below this peak opacity the eta and N_tot errors get a warning (method §7)
AT_BOUND_TOL = 1e-3  # a free parameter this close (unit cube) to a face of the box is at it
DETECT_DCHI2 = 25.0  # detected: chi2(no molecule) - min chi2 along N_tot >= this (method §7)
LIMIT_SIGMA = 3.0  # upper limit: N_tot where chi2 is LIMIT_SIGMA^2 above its minimum (method §7)
LIMIT_SCAN_DEX = (-6.0, 2.0)  # dex added below and above the box's N_tot range for the profile


# --- the chi2 polish after the pm loss (issue 14) ---


def unexplained_channels(r: np.ndarray, obs_n: np.ndarray, n_sigma: float = PEAK_SIGMA):
    """Channels (M,) bool of emission the fitted model does not explain (blends to drop).

    A channel is unexplained where the data exceed the model by n_sigma rms and by more than
    the model itself (over half of the emission there is not the fit's); each such channel
    takes with it the contiguous run around it where the data exceed the model by 1 rms.

    Args:
        r: (M,) (T_obs - T_model) / rms at the fit. obs_n: (M,) T_obs / rms.
    """
    seed = (r > n_sigma) & (r > obs_n - r)
    over = r > 1.0
    run = np.cumsum(np.diff(np.concatenate([[0], over.astype(np.int8)])) == 1) * over  # run ids
    return over & np.isin(run, run[seed & over])


def chi2_polish(resid, resid_x, u: np.ndarray, box: dict, n_rounds: int = 3) -> tuple:
    """Least-squares refinement of a pm optimum u, on the channels its model explains.

    The pm loss (§4) and chi2 have different minima; the Gauss-Newton errors are the curvature
    of chi2, so they describe the chi2 minimum. This moves the pm fit there, leaving out the
    emission the model does not explain (unexplained_channels) so that a blend with another
    line does not pull the fit (ours, issue 14). The channels are chosen again at each
    refined point, up to n_rounds times, until they no longer change.

    Args:
        resid: U (B, n_free) -> (B, M) noise-normalised residuals; resid_x: the same of
            physical X (B, 5 k) (noise_residuals). u: the pm optimum (n_free,).

    Returns:
        (u, keep (M,) bool: the channels used, info dict: n_chan, n_dropped, chi2_pm and
        chi2 (over all channels, at the pm optimum and at u), nfev).
    """
    X0 = to_physical(u, box)
    X0[:, 2::5] = 0.0  # no molecule: the observed spectrum / rms
    obs_n, r = resid_x(X0)[0], resid(u[None])[0]
    chi2_pm, nfev, keep = float(r @ r), 2, None
    for _ in range(n_rounds):  # a pm fit far off leaves its own lines "unexplained" at first
        new = ~unexplained_channels(r, obs_n)
        if keep is not None and np.array_equal(new, keep):
            break
        keep = new
        u, chi2, _, n = refine_least_squares(resid, u, keep)
        r = resid(u[None])[0]
        nfev += n + 1
    info = dict(n_chan=int(keep.sum()), n_dropped=int((~keep).sum()), chi2_pm=chi2_pm,
                chi2=float(r @ r), nfev=nfev)  # fmt: skip
    return u, keep, info


def polish_pm(resid, resid_x, u: np.ndarray, box: dict) -> tuple:
    """chi2_polish of a pm optimum u, applied unless its model leaves more than FOREST_DROP of
    the channels unexplained (a line forest: the pm values are kept, see FOREST_DROP).

    Returns:
        (u, resid_fit: the residuals whose curvature gives the errors, chi2_polish's info, with
        "kept_pm" saying why where the polish is not applied).
    """
    u_ls, keep, polish = chi2_polish(resid, resid_x, u, box)
    if polish["n_dropped"] <= FOREST_DROP * keep.size:
        if polish["n_dropped"] >= BLENDED * keep.size:
            polish["lower_bound"] = (f"{polish['n_dropped']} of {keep.size} channels hold "
                                     "emission the model does not explain (blends): the errors "
                                     "are lower bounds (docs/benchmarks.md §10)")  # fmt: skip
        return u_ls, (lambda U: resid(U)[:, keep]), polish
    polish["kept_pm"] = (f"{polish['n_dropped']} of {keep.size} channels unexplained "
                         "(a line forest): the pm values are kept, and their errors are "
                         "the chi2 curvature there, a lower bound")  # fmt: skip
    return u, resid, polish


# --- 1-sigma errors at the optimum (issue 3) ---


def physical_errors(resid, u: np.ndarray, box: dict) -> tuple:
    """Parameters and 1-sigma errors in physical units at u (Gauss-Newton on chi2), NaN with a
    note where there is no symmetric error: fixed, unconstrained, or at a face of the box.

    Returns:
        (X (5 k,), sigma (5 k,), notes {index: text}, at_bound {index: "lower" or "upper"},
        nfev of the error estimate).
    """
    free_names = [n for n, f in zip(box["names"], box["free"]) if f]
    sigma_u, notes_u, nfev_err = gauss_newton_errors(resid, u, free_names)
    X = to_physical(u, box)[0]
    sigma = np.full(X.size, np.nan)
    sigma_q = sigma_u * (box["q_hi"] - box["q_lo"])[box["free"]]
    sigma[box["free"]] = np.where(box["log"][box["free"]], np.log(10) * X[box["free"]], 1) * sigma_q
    notes = {i: "fixed" for i in np.flatnonzero(~box["free"])}
    notes.update({np.flatnonzero(box["free"])[i]: r for i, r in notes_u.items()})
    for i, s in zip(np.flatnonzero(box["free"]), sigma_q):
        if box["log"][i] and s > 1:
            notes[i] = "unconstrained: 1-sigma beyond a factor of 10"
    at_bound, bound_text = bound_notes(u, box)  # issue 15: no symmetric error at a face
    notes.update({i: "; ".join(filter(None, (notes.get(i), t))) for i, t in bound_text.items()})
    sigma[list(notes)] = np.nan
    return X, sigma, notes, at_bound, nfev_err


def thin_remarks(problem: Problem, X: np.ndarray, molecules: list, box: dict) -> tuple:
    """Each molecule's largest line-centre opacity at X, and the warning on its eta and N_tot
    errors where the lines are nearly thin (peak tau < NEARLY_THIN_TAU, both free).

    Returns:
        (tau_max {mol: float}, remarks {index into the 5 k vector: text}).
    """
    names = [m.name for m in molecules]
    tau_max = {
        m.name: max(float(lte.peak_opacity(w.freq_MHz, lines[k], X[5 * k : 5 * k + 5]))
                    for w, lines in zip(problem.windows, problem.lines))
        for k, m in enumerate(molecules)
    }  # fmt: skip
    remarks = {
        5 * k + i: f"nearly thin lines (peak tau {tau_max[m]:.2g}): eta and N_tot trade off along "
        "a valley that is not quadratic, so this error may be far too small"
        for k, m in enumerate(names)
        if tau_max[m] < NEARLY_THIN_TAU and box["free"][5 * k] and box["free"][5 * k + 2]
        for i in (0, 2)
    }
    return tau_max, remarks


# --- faces of the box and non-detections (issue 15) ---


def bound_notes(u: np.ndarray, box: dict, tol: float = AT_BOUND_TOL) -> tuple[dict, dict]:
    """Free parameters that end within tol (unit cube) of a face of the box, and what to do.

    At a face the chi2 minimum is not inside the box, so the curvature there is no 1-sigma
    error: fit_spectrum reports NaN with this note instead.

    Returns:
        flags {index into the 5 k vector: "lower" or "upper"}, notes {index: text}.
    """
    flags, notes = {}, {}
    n_mol = len(box["names"]) // 5
    for side, i in zip(bound_flags(u, tol), np.flatnonzero(box["free"])):
        if not side:
            continue
        p, key = PARAM_NAMES[i % 5], box["names"][i] if n_mol > 1 else PARAM_NAMES[i % 5]
        lo, hi = (10 ** box[k][i] if box["log"][i] else box[k][i] for k in ("q_lo", "q_hi"))
        flags[i] = str(side)
        if p == "eta" and side == "upper" and hi >= ETA_MAX:
            notes[i] = "eta at its maximum, 1 (the source fills the beam): no symmetric error"
            continue
        if box["log"][i]:  # a factor of 100 for N_tot and eta, 10 for T_ex and delta_v
            f = 100.0 if p in ("N_tot", "eta") else 10.0
            lo, hi = (lo / f, hi) if side == "lower" else (lo, hi * f)
            hi = min(hi, ETA_MAX) if p == "eta" else hi
        else:
            w = hi - lo
            lo, hi = (lo - w / 2, hi) if side == "lower" else (lo, hi + w / 2)
        at = 10 ** box["q_lo" if side == "lower" else "q_hi"][i] if box["log"][i] else (
            box["q_lo" if side == "lower" else "q_hi"][i])  # fmt: skip
        notes[i] = (f"{p} at its {side} bound {at:g}: widen it with --bounds {key}={lo:g}:{hi:g} "
                    "(no symmetric 1-sigma error at a bound)")  # fmt: skip
    return flags, notes


def residuals_at(windows, molecules, X, v_lsr_kms: float = 0.0, dish_m=None):
    """Problem.resid_x, X (B, 5 k) physical -> (T_obs - T_model) / rms (B, M), of a problem
    whose box holds X's widths and offsets: built once, for scans that vary N_tot only."""
    X = np.atleast_2d(X)
    v, fwhm = np.abs(X[:, 4::5]).max(), X[:, 3::5]
    box = make_box([m.name for m in molecules], {
        "v_off": (-max(v, 12.0), max(v, 12.0)),
        "delta_v": (min(fwhm.min(), 0.3), max(fwhm.max(), 30.0) * 1.001)})  # fmt: skip
    return Problem(windows, molecules, box, "chi2", v_lsr_kms, dish_m).resid_x


def noise_residuals(windows, molecules, X, v_lsr_kms: float = 0.0, dish_m=None) -> np.ndarray:
    """(T_obs - T_model) / rms over all channels of the windows at physical X (B, 5 k) -> (B, M)."""
    return residuals_at(windows, molecules, X, v_lsr_kms, dish_m)(X)


def detect_and_limit(resid_x, X: np.ndarray, k: int, box: dict, n_sigma: float = LIMIT_SIGMA,
                     dchi2_min: float = DETECT_DCHI2, step_dex: float = 0.1,
                     chi2_x=None, limit: bool = True, near_dex: float = 1.0) -> dict:  # fmt: skip
    """Detection test and upper limit of molecule k's N_tot along its chi2 profile.

    chi2(N) = sum_c resid_x(X with N_tot,k = N)_c^2, the other parameters held at X (fixed,
    not profiled), on a grid of step_dex in log10 N over the box's range widened by
    LIMIT_SCAN_DEX, and at N = 0 (no molecule k). The molecule is detected when
    Delta chi2 = chi2(0) - min_{N >= 0} chi2(N) >= dchi2_min (25: 5 sigma for one parameter;
    the shape parameters, fitted to the same data, make a chance Delta chi2 larger). The upper
    limit is the N above the minimum where chi2 = min + n_sigma^2: one-sided; for thin lines
    (T linear in N, chi2 = min + ((N - N_hat) / sigma_N)^2 over all real N) it is
    N_hat + n_sigma sigma_N, or N_hat + sqrt(N_hat^2 + (n_sigma sigma_N)^2) when N_hat < 0.

    Args:
        resid_x: X (B, 5 k) -> (B, M) noise-normalised residuals (noise_residuals).
        X: (5 k,) physical parameters, e.g. the fit. box: make_box's box (N_tot range).
        chi2_x: X (B, 5 k) -> (B,) the sum of squares of resid_x, e.g. Problem.chi2_x (the
            touched channels only); None = from resid_x.
        limit: False for the detection test alone (a cube pixel, whose limit map is made
            elsewhere): the grid points within near_dex of the fitted N_tot, and the whole
            grid only where their minimum is at an end of them; the same dchi2 as the whole
            grid whenever chi2 has one minimum along N_tot. N_tot_upper is then NaN.

    Returns:
        dict: dchi2, detected (bool), N_tot_upper (cm^-2; NaN when chi2 never rises by
        n_sigma^2 within the scan, e.g. saturated lines), N_tot_best (argmin, 0 if none
        better than no molecule), n_sigma, held (the other parameters {name: value}), nfev.
    """
    i = 5 * k + 2
    lo, hi = box["q_lo"][i] + LIMIT_SCAN_DEX[0], box["q_hi"][i] + LIMIT_SCAN_DEX[1]
    grid = np.arange(lo, hi + step_dex / 2, step_dex)

    def chi2(log10_N):  # (n,) -> (n,), one batched model call
        XB = np.tile(X, (np.size(log10_N), 1))
        XB[:, i] = np.where(np.isfinite(log10_N), 10.0 ** np.asarray(log10_N, float), 0.0)
        return chi2_x(XB) if chi2_x is not None else np.sum(resid_x(XB) ** 2, axis=1)

    use = np.ones(grid.size, bool)
    if not limit:  # the minimum is near the fit: start there
        use = np.abs(grid - np.log10(max(X[i], 1e-300))) <= near_dex + 1e-9
    chi2_all = chi2(np.concatenate([[-np.inf], grid[use]]))
    chi2_zero, chi2_grid = chi2_all[0], np.full(grid.size, np.inf)
    chi2_grid[use] = chi2_all[1:]
    j = int(np.argmin(chi2_grid))
    if not use.all() and (j in (0, grid.size - 1) or not (use[j - 1] and use[j + 1])):
        chi2_grid[~use] = chi2(grid[~use])  # the minimum at an end of them: the whole grid
        use[:] = True
    if limit:
        x_up, chi2_min, nfev = profile_crossing(chi2, grid, n_sigma**2, chi2_zero, chi2_grid)
    else:
        x_up, chi2_min, nfev = np.nan, min(float(chi2_grid.min()), chi2_zero), 0
    best = float(10 ** grid[np.argmin(chi2_grid)]) if chi2_grid.min() < chi2_zero else 0.0
    held = {p: float(X[5 * k + j]) for j, p in enumerate(PARAM_NAMES) if p != "N_tot"}
    nfev += int(use.sum()) + 1
    return dict(dchi2=float(chi2_zero - chi2_min), detected=bool(chi2_zero - chi2_min >= dchi2_min),
                N_tot_upper=float(10**x_up) if np.isfinite(x_up) else float("nan"),
                N_tot_best=best, n_sigma=n_sigma, held=held, nfev=nfev)  # fmt: skip


def limit_text(mol: str, det: dict) -> str:
    """One line on a molecule's detection, and its N_tot upper limit when not detected."""
    if det["detected"]:
        return f"detection[{mol}]: detected (dchi2={det['dchi2']:.4g} >= {DETECT_DCHI2:g})"
    held = ", ".join(f"{p}={v:.4g}" for p, v in det["held"].items())
    limit = (f"N_tot < {det['N_tot_upper']:.3g} cm-2 ({det['n_sigma']:g} sigma, with {held})"
             if np.isfinite(det["N_tot_upper"]) else "no upper limit (chi2 never rises by "
             f"{det['n_sigma'] ** 2:g} within the scan: lines saturate at {held})")  # fmt: skip
    return f"detection[{mol}]: not detected (dchi2={det['dchi2']:.3g} < {DETECT_DCHI2:g}): {limit}"
