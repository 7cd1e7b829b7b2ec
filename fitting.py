"""Fit one spectrum: `fit_spectrum`, from the parameter box to values, errors and limits.

The steps of docs/method.md for one spectrum, in order: the unit cube over the parameter box and
the loss of the windows (§3, §4: problem.Problem), the starts and their local refinement (§7:
methods.METHODS, with the policy network's proposals), and what follows the optimum
(uncertainty.py): the chi2 polish of a pm fit (issue 14), the 1-sigma errors (issue 3), the
faces of the box and the detection test with N_tot upper limits (issue 15). spectuner.py is its
command line and re-exports it (spectuner.fit_spectrum), as fit_cube, train and evaluate call it.

    import lte, fitting, spectra
    windows, _ = spectra.read_spec_windows("data/demo_spectrum.txt")
    res = fitting.fit_spectrum(windows, [lte.load_molecule("CH3OH")], "random+slsqp", v_lsr_kms=5)
"""

from __future__ import annotations

import time

import numpy as np

import lte
from losses import LOSSES
from methods import METHODS, network_starts, resolve_method
from problem import PARAM_NAMES, Problem, Window, make_box, to_unit
from uncertainty import detect_and_limit, physical_errors, polish_pm, thin_remarks


def fit_spectrum(
    windows: list[Window],
    molecules: list,
    method: str = "auto",
    loss: str = "pm",
    n_init: int = 50,
    seed: int = 0,
    bounds: dict | None = None,
    fix: dict | None = None,
    v_lsr_kms: float = 0.0,
    dish_m: float | None = None,
    policy=None,
    pso_restarts: int = 1,
    starts=None,
    chi2_refine: bool = True,
    n_refine: int = 1,
    maxiter: int = 100,
    extra_starts=None,
    limits: bool = True,
) -> dict:
    """Fit k molecules jointly (5 LTE parameters each) to the windows (§3, §4, §7).

    Args:
        windows: observed windows (observed frame); the losses of the windows add up.
        molecules: lte.Molecule list; their intensities are summed.
        method: a key of METHODS, or "auto": nn+stack+slsqp when a policy is available (`policy`, or
            data/policy.pt), else random+slsqp (said in the result's "note").
        loss: "pm" or "chi2". n_init: random starts, or policy samples for the nn methods.
        seed: seeds all draws; the result is deterministic for a seed.
        bounds, fix: see make_box. v_lsr_kms: systemic velocity (nu_rest = nu_obs (1 + v / c)).
        dish_m: single-dish diameter; eta is then the value at the data centre (§2).
        policy: path of a policy file, or a loaded (net, model config); None = data/policy.pt.
            A spectrum outside what it was trained on falls back to random starts (the result's
            "fallback" says why). pso_restarts: independent swarms for the pso methods.
        starts: for the nn methods, (n_init, n_free) unit-cube starts drawn elsewhere (or the
            reason string) from policy_starts, which batches the network over many spectra.
        chi2_refine: with the pm loss, refine its optimum by least squares (chi2_polish) on the
            channels the model explains, so that the values and the errors (chi2 curvature)
            belong to one minimum (issue 14). loss and nfev stay the optimiser's (method §8).
        n_refine: the best n_refine distinct starts (more than 0.05 apart in the unit cube)
            are refined and the best result kept; their runs are in nfev. The command line's
            default is 2 (docs/benchmarks.md §8); 1 here keeps library calls as before.
        extra_starts: (m, 5 k) physical parameter sets evaluated beside the method's own
            starts and refined like them (taking turns, see n_refine), e.g. the fits of a cube
            pixel's neighbours (cube_passes.py); not used by the pso methods. None = none.
        limits: False for the detection test without the N_tot upper limit (detect_and_limit's
            limit=False: a cube pixel, whose limit map is made from a reference shape).
        maxiter: SLSQP iterations per refinement. When the chi2 refinement then sets the values,
            a refinement stopped by this limit is not a failure (status stays "ok").

    Returns:
        dict: params, errors, error_notes ({mol: {name: ...}}: why an error is NaN, or a
        warning), loss, nfev (the fit's forward-model evaluations), nfev_errors, time_s, status,
        method, loss_name, tau_max ({mol: largest line-centre opacity at the fit}),
        chi2_refine (chi2_polish's info, None without it), at_bound, detection (+
        source_size_arcsec and eta_ref_MHz for a single dish). The errors are statistical
        (Gauss-Newton on chi2 at the optimum, noise only): lines of other molecules and model
        errors are not in them.

    Raises:
        ValueError: unknown method or loss, no or duplicate molecules, nothing free to fit.
    """
    t0 = time.perf_counter()
    # --- the problem: method, box and objective (§3, §4) ---
    method, note = resolve_method(method, policy)
    names = _check_fit(method, loss, molecules, n_refine)
    if not (isinstance(maxiter, int) and maxiter >= 1):
        raise ValueError(f"maxiter={maxiter}: expected an integer >= 1")
    box = make_box(names, bounds, fix)
    if not box["free"].any():
        raise ValueError("every parameter is fixed: nothing to fit (use the model command)")
    objective = Problem(windows, molecules, box, loss, v_lsr_kms, dish_m)
    objective.maxiter = maxiter
    # --- starts and local refinement (§7) ---
    rng = np.random.default_rng(seed)
    n_free = int(box["free"].sum())
    method, kw, fallback = network_starts(
        method, starts, policy, objective.windows, molecules, box, seed
    )
    if extra_starts is not None and len(extra_starts):
        X = np.asarray(extra_starts, dtype=float)
        if X.ndim != 2 or X.shape[1] != 5 * len(names) or not np.isfinite(X).all():
            raise ValueError(f"extra_starts: expected finite (m, {5 * len(names)}) physical "
                             f"parameter sets, got shape {X.shape}")  # fmt: skip
        kw["extra"] = to_unit(X, box)
    u, best, nfev, status = METHODS[method](
        objective, n_free, n_init, rng, n_restarts=pso_restarts, n_refine=n_refine, **kw
    )
    assert nfev == objective.nfev, (nfev, objective.nfev)  # every model run is counted
    # --- values and errors of one chi2 minimum (issues 3, 14) ---
    polish, resid_fit = None, objective.resid
    if loss == "pm" and chi2_refine:
        u, resid_fit, polish = polish_pm(objective.resid, objective.resid_x, u, box)
        status = "ok" if status == "maxiter" and "kept_pm" not in polish else status
    X, sigma, notes, at_bound, nfev_err = physical_errors(resid_fit, u, box)
    tau_max, remarks_thin = thin_remarks(objective, X, molecules, box)
    result = dict(
        params=_per_molecule(names, X),
        errors=_per_molecule(names, sigma),
        error_notes=_notes_per_molecule(names, {**remarks_thin, **notes}),  # why NaN, or a warning
        loss=float(best),
        nfev=int(nfev),
        nfev_errors=nfev_err,
        time_s=time.perf_counter() - t0,
        status=status if np.isfinite(best) else "non-finite loss",
        method=method,
        loss_name=loss,
        note=note,
        fallback=fallback,
        tau_max=tau_max,
    )
    # --- issue 15: faces of the box, detection and upper limits on N_tot ---
    result["at_bound"] = {m: {PARAM_NAMES[i % 5]: side for i, side in at_bound.items()
                              if i // 5 == k} for k, m in enumerate(names)}  # fmt: skip
    result["chi2_refine"] = polish
    result["detection"] = {
        m: detect_and_limit(objective.resid_x, X, k, box, chi2_x=objective.chi2_x, limit=limits)
        for k, m in enumerate(names)
    }
    if dish_m:
        result |= _source_size(objective.nu_ref, X, names, dish_m)
    return result


def _check_fit(method: str, loss: str, molecules: list, n_refine: int) -> list[str]:
    """The molecules' names, after checking fit_spectrum's method, loss, molecules, n_refine."""
    if method not in METHODS or loss not in LOSSES:
        raise ValueError(
            f"method {method!r} / loss {loss!r}: expected one of "
            f"{sorted(METHODS)} / {sorted(LOSSES)}"
        )
    names = [m.name for m in molecules]
    if not names or len(set(names)) < len(names):
        raise ValueError(f"molecules {names}: expected at least one, each once")
    if n_refine < 1:
        raise ValueError(f"n_refine={n_refine}: expected an integer >= 1")
    return names


def _per_molecule(names: list, a: np.ndarray) -> dict:
    """A (5 k,) vector as {mol: {eta, T_ex, N_tot, delta_v, v_off}} of floats."""
    return {
        m: dict(zip(PARAM_NAMES, map(float, a[5 * k : 5 * k + 5]))) for k, m in enumerate(names)
    }


def _notes_per_molecule(names: list, notes: dict) -> dict:
    """{index into the 5 k vector: text} as {mol: {name: text}}."""
    out = {m: {} for m in names}
    for i, reason in notes.items():
        out[names[i // 5]][PARAM_NAMES[i % 5]] = reason
    return out


def _source_size(nu_ref_MHz: float, X: np.ndarray, names: list, dish_m: float) -> dict:
    """Single dish (§2): the source size that eta = theta_s^2 / (theta_s^2 + theta_b^2) implies
    at the reference frequency, where the beam is 1.22 lambda / D."""
    beam_ref = 1.22 * lte.C_KMS * 1e3 / (nu_ref_MHz * 1e6 * dish_m) * 206264.806  # arcsec
    eta = X[0::5]
    sizes = dict(zip(names, map(float, beam_ref * np.sqrt(eta / (1 - eta)))))
    return dict(source_size_arcsec=sizes, eta_ref_MHz=nu_ref_MHz)
