"""Fit one spectrum with the LTE model: parameter box, losses, optimisers, errors, command line.

Implements docs/method.md §3 (unit cube over the parameter box), §4 (chi2 and peak-matching losses),
§7 (best of N_init starts refined by SLSQP or Nelder-Mead; particle swarm, optionally polished
by the same local optimisers, ours) and the 1-sigma errors of issue 3, for Qiu et al.,
arXiv:2511.21027 (Spectuner-D1) and Spectuner (ApJS 277, 21).

    python spectuner.py fit data/demo_spectrum.txt --mol CH3OH --v_lsr 5 --json fit.json \
        --plot fit.png
    python spectuner.py model --mol CH3OH --freq_MHz 241700:241900:4000 --fix eta=0.5 \
        --fix T_ex=150 --fix N_tot=1e17 --fix delta_v=2 --fix v_off=0 --out model.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import re
import sys
import time
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

import lte
import stack
from losses import LOSSES, PEAK_SIGMA, find_spans, fp_weight, loss_chi2, loss_pm  # noqa: F401
from optimise import (
    bound_flags,
    gauss_newton_errors,
    profile_crossing,
    pso,
    refine_least_squares,
    refine_nelder_mead,
    refine_slsqp,
)
from problem import (  # noqa: F401  (the box and window are part of this module's API)
    DEFAULT_BOUNDS,
    ETA_MAX,
    IS_LOG,
    PARAM_NAMES,
    Problem,
    Window,
    make_box,
    to_physical,
    to_unit,
)


@dataclasses.dataclass
class Config:
    command: str = "fit"  # fit (fit SPEC files) or model (write a model spectrum)
    spec: list[str] = dataclasses.field(default_factory=list)  # SPEC files: freq MHz, T K columns
    mol: list[str] = dataclasses.field(default_factory=list)  # molecule names or catalogue paths
    catalog: str = ""  # catalogue file for every --mol; "" = lte's bundled default
    rms: list[float] = dataclasses.field(default_factory=list)  # K, one per SPEC; none = estimate
    beam_arcsec: float = 0.0  # interferometer beam FWHM, arcsec (eta fitted directly); 0 = unset
    dish_m: float = 0.0  # single-dish diameter, m (eta fitted at the data centre); 0 = unset
    T_bg_K: float = 0.0  # continuum brightness under the lines, K
    v_lsr: float = 0.0  # systemic velocity, km/s; nu_rest = nu_obs (1 + v_lsr / c)
    bounds: list[str] = dataclasses.field(default_factory=list)  # [MOL:]NAME=LO:HI, physical units
    fix: list[str] = dataclasses.field(default_factory=list)  # [MOL:]NAME=VALUE, physical units
    method: str = "auto"  # auto (nn+stack+slsqp if a policy exists), nn, nn+slsqp,
    # nn+nelder-mead, nn+stack+slsqp, random+slsqp, random+nelder-mead, pso, pso+slsqp,
    # pso+nelder-mead, stack, stack+slsqp, stack+nelder-mead (matched filter, no network)
    policy: str = ""  # policy file for the nn methods; "" = data/policy.pt
    loss: str = "pm"  # pm (peak matching) or chi2
    n_init: int = 50  # random starts (policy samples for nn methods)
    pso_restarts: int = 1  # independent particle-swarm runs, best kept
    n_refine: int = 2  # best distinct starts refined by the local optimiser, best kept (>= 1)
    seed: int = 0  # seeds every random draw
    json: str = ""  # write the result here (JSON); "" = do not
    plot: str = ""  # draw data, model and residual per window here (PNG); "" = do not
    freq_MHz: str = ""  # model: LO:HI:N channel grid, used when no SPEC file is given
    out: str = "model.txt"  # model: output spectrum (freq MHz, T K); _i suffix for several grids


FOREST_DROP = 0.5  # chi2 refinement not applied when more channels than this are unexplained:
# on the IRAS 16293-2422 B windows (57 % unexplained) it narrowed CH3OH from the pm fit's
# 0.62 km/s to 0.49 km/s, below the 0.7-1.4 km/s of the real lines, by dropping blended wings
NEARLY_THIN_TAU = 0.2  # below this peak opacity the eta and N_tot errors get a warning (README)
AT_BOUND_TOL = 1e-3  # a free parameter this close (unit cube) to a face of the box is at it
DETECT_DCHI2 = 25.0  # detected: chi2(no molecule) - min chi2 along N_tot >= this (README)
LIMIT_SIGMA = 3.0  # upper limit: N_tot where chi2 is LIMIT_SIGMA^2 above its minimum (README)
LIMIT_SCAN_DEX = (-6.0, 2.0)  # dex added below and above the box's N_tot range for the profile


# --- methods (§7): a start (random, swarm or network) and a local refinement ---


DISTINCT = 0.05  # two starts are distinct when farther apart than this in the unit cube


def _then_local(f, u, loss, nfev, status, local):
    """The start (u, loss) after nfev runs, refined by `local` if given, its runs added."""
    if local is None:
        return u, loss, nfev, status
    u, loss, nfev_local, status = local(f, u, loss)
    return u, loss, nfev + nfev_local, status


def _refine_distinct(f, U, L, nfev, status, local, n_refine=1):
    """Refine the best n_refine distinct starts of U (n, n_dim) with losses L (n,), each more
    than DISTINCT (Euclidean, unit cube) from the better ones kept; the best result, with
    every refinement's runs added to nfev (ours, issue 12)."""
    order = np.argsort(L, kind="stable")
    picked = []
    for i in order:
        if all(np.linalg.norm(U[i] - U[j]) > DISTINCT for j in picked):
            picked.append(i)
        if len(picked) >= max(1, n_refine) or local is None:
            break
    best = None
    for i in picked:
        run = _then_local(f, U[i], float(L[i]), 0, status, local)
        nfev += run[2]
        best = run if best is None or run[1] < best[1] else best
    return best[0], best[1], nfev, best[3]


def run_random_local(f, n_dim, n_init, rng, n_restarts=1, local=refine_slsqp, n_refine=1):
    """Best n_refine distinct of n_init uniform starts refined by a local optimiser (§7)."""
    U = rng.random((n_init, n_dim))
    return _refine_distinct(f, U, f(U), n_init, "ok", local, n_refine)


def run_pso(f, n_dim, n_init, rng, n_restarts=1, local=None, n_refine=1):
    """Best of n_restarts independent particle swarms (§7; n_init is unused), then, if `local`
    is given (ours: pso+slsqp), a local polish from the best n_refine distinct swarm results.

    The swarm's stopping rule (15 cycles under 1e-5 relative gain) often fires while the best
    particle still lies on the floor of a long valley (eta-N_tot-T_ex of thin or broad lines),
    a few sigma from the minimum; a polish of tens to a few hundred runs takes it to the bottom.
    """
    runs = [pso(f, n_dim, rng) for _ in range(n_restarts)]
    U, L = np.array([r[0] for r in runs]), np.array([r[1] for r in runs])
    status = min(runs, key=lambda r: r[1])[3]
    return _refine_distinct(f, U, L, sum(r[2] for r in runs), status, local, n_refine)


def _stack_starts(f):
    """Matched-filter starts of stack.py for a Problem f: (U, L, model runs they cost)."""
    if not isinstance(f, Problem):
        raise ValueError("the stack methods need a problem.Problem objective (fit_spectrum)")
    nfev0 = f.nfev
    U, L = stack.candidates(f)
    return U, L, f.nfev - nfev0


def run_stack(f, n_dim, n_init, rng, n_restarts=1, local=None, n_refine=1):
    """Velocity-stacking starts (stack.py: one matched filter per (T_ex, FWHM) template, a
    handful of model runs; n_init is unused), the best n_refine distinct refined by `local`."""
    U, L, nfev = _stack_starts(f)
    return _refine_distinct(f, U, L, nfev, "ok", local, n_refine)


def run_policy(f, n_dim, n_init, rng, n_restarts=1, local=None, propose=None, with_stack=False,
               n_refine=1):  # fmt: skip
    """Best of n_init policy samples, refined by `local` if given (§7: nn, nn+slsqp, ...).

    propose(n) -> (n, n_dim) unit-cube starts from the network (see policy_sampler). With
    with_stack (nn+stack+slsqp, ours), the matched-filter starts of stack.py join the samples
    (their runs counted); the best n_refine distinct starts are refined.
    """
    U = propose(n_init)
    L, nfev = f(U), n_init
    if with_stack:
        U_s, L_s, nfev_s = _stack_starts(f)
        U, L, nfev = np.vstack([U, U_s]), np.concatenate([L, L_s]), nfev + nfev_s
    return _refine_distinct(f, U, L, nfev, "ok", local, n_refine)


METHODS = {
    "random+slsqp": run_random_local,
    "random+nelder-mead": partial(run_random_local, local=refine_nelder_mead),
    "pso": run_pso,
    "pso+slsqp": partial(run_pso, local=refine_slsqp),
    "pso+nelder-mead": partial(run_pso, local=refine_nelder_mead),
    "stack": run_stack,
    "stack+slsqp": partial(run_stack, local=refine_slsqp),
    "stack+nelder-mead": partial(run_stack, local=refine_nelder_mead),
    "nn": run_policy,
    "nn+slsqp": partial(run_policy, local=refine_slsqp),
    "nn+nelder-mead": partial(run_policy, local=refine_nelder_mead),
    "nn+stack+slsqp": partial(run_policy, local=refine_slsqp, with_stack=True),
}
DEFAULT_POLICY = Path(__file__).resolve().parent / "data" / "policy.pt"


# --- the policy network's proposals (§5, §7) ---


@lru_cache(maxsize=4)
def load_policy(path: str):
    """(net, model config) from a policy file written by train.py, on the CPU, cached by path.

    Raises:
        FileNotFoundError: no such file. ValueError: torch is not installed.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"policy file {path} not found (train one with train.py)")
    try:
        import model
    except ImportError as err:
        raise ValueError(f"the nn methods need torch ({err}); use random+slsqp") from None
    return model.load_policy(path, device="cpu")


def resolve_method(method: str, policy) -> tuple[str, str]:
    """'auto' -> nn+stack+slsqp when a policy is available, else random+slsqp; with the reason."""
    if method != "auto":
        return method, ""
    path = policy or DEFAULT_POLICY
    if not isinstance(path, (str, Path)) or Path(path).is_file():
        try:
            import torch  # noqa: F401

            return "nn+stack+slsqp", ""
        except ImportError:
            return "random+slsqp", "torch is not installed: random+slsqp instead of nn+slsqp"
    return "random+slsqp", f"no policy at {path}: random+slsqp instead of nn+slsqp"


def line_table(mol, mcfg) -> dict:
    """The arrays model.make_tokens reads for a molecule, with log10 Q at the model's
    temperatures; train.py builds its tokens with it too, so training and fitting agree."""
    table = {k: getattr(mol, k) for k in ("freq_MHz", "A_s", "g_u", "E_low_K", "E_up_K")}
    table["log10_Q"] = np.log10(mol.Q(np.asarray(mcfg.Q_temps_K, dtype=float)))
    return table


def _policy_tokens(mcfg, windows: list, molecules: list, box: dict):
    """Each molecule's tokens for one spectrum, or (None, reason) when the spectrum is outside
    what the network was trained on (a box beyond the training box, no transition in reach)."""
    import model

    train_box = make_box([m.name for m in molecules])
    if np.any(box["q_lo"] < train_box["q_lo"] - 1e-9) or np.any(
        box["q_hi"] > train_box["q_hi"] + 1e-9
    ):
        return None, "bounds reach beyond the box the network was trained on"
    tokens = []
    for mol in molecules:
        tokens.append(model.make_tokens(windows, line_table(mol, mcfg), mcfg))
        if tokens[-1]["spec"].shape[0] == 0:
            return None, f"{mol.name} has no transition in reach of the windows"
    return tokens, ""


def _policy_draw(net, token_sets: list, n: int, seeds: list, names: list, box: dict) -> np.ndarray:
    """n network samples for each of S spectra, the i-th samples of the molecules combined and
    mapped through the training box to `box`: (n, S, n_free). The encoder runs once over all
    spectra (batched); each spectrum's samples come from its own seed, so they do not depend on
    which other spectra share the batch. Samples that fall outside a `box` narrower than the
    training box are replaced by uniform draws inside it (clipping would pile them on its faces).
    """
    import torch

    import model

    k = len(names)
    batch = model.collate([t for tokens in token_sets for t in tokens])  # S * k states
    with torch.no_grad():
        context = net(batch)  # (S k, D)
        u = [net.flow.sample(context[i * k : (i + 1) * k], n,
                             torch.Generator().manual_seed(int(seed)))[0]
             for i, seed in enumerate(seeds)]  # fmt: skip
    u = torch.stack(u, 1).double().numpy().reshape(n * len(token_sets), 5 * k)  # (n S, 5 k)
    U = to_unit(to_physical(u, make_box(names)), box).reshape(n, len(token_sets), -1)
    for i, seed in enumerate(seeds):  # samples outside a narrower user box: uniform in it (ours)
        out = np.any((U[:, i] < 0) | (U[:, i] > 1), axis=1)
        U[out, i] = np.random.default_rng(int(seed)).random((n, U.shape[2]))[out]
    return U


def policy_sampler(policy, windows: list, molecules: list, box: dict, seed: int):
    """propose(n) -> (n, n_free) unit-cube starts from the network for one spectrum.

    Returns:
        (propose, reason): propose is None with the reason when the spectrum is outside what
        the network was trained on.
    """
    net, mcfg = load_policy(str(policy)) if isinstance(policy, (str, Path)) else policy
    tokens, reason = _policy_tokens(mcfg, windows, molecules, box)
    if tokens is None:
        return None, reason
    names = [m.name for m in molecules]
    return (lambda n: _policy_draw(net, [tokens], n, [seed], names, box)[:, 0]), ""


def policy_starts(spectra: list, molecules: list, n: int, seeds, policy=None,
                  bounds=None, fix=None, v_lsr_kms: float = 0.0) -> list:  # fmt: skip
    """Network starts for many spectra (e.g. cube pixels) in one batched call of the network.

    Args:
        spectra: list of window lists (each as for fit_spectrum). n: samples per spectrum.
        seeds: one seed per spectrum (as fit_spectrum's seed: the same starts as it would draw).
        policy, bounds, fix, v_lsr_kms: as for fit_spectrum.
    Returns:
        per spectrum, an (n, n_free) array of unit-cube starts for fit_spectrum(starts=...), or a
        string saying why the network cannot propose (fit_spectrum then uses random starts).
    """
    net, mcfg = (
        load_policy(str(policy or DEFAULT_POLICY)) if not isinstance(policy, tuple) else policy
    )
    names = [m.name for m in molecules]
    box = make_box(names, bounds, fix)
    out, token_sets, where = [], [], []
    seeds = np.broadcast_to(seeds, len(spectra))
    for windows in spectra:
        try:
            rest = Problem(windows, molecules, box, v_lsr_kms=v_lsr_kms).windows
            tokens, reason = _policy_tokens(mcfg, rest, molecules, box)
        except ValueError as err:
            tokens, reason = None, str(err)
        out.append(reason)
        if tokens is not None:
            token_sets.append(tokens)
            where.append(len(out) - 1)
    if token_sets:
        draws = _policy_draw(net, token_sets, n, [seeds[i] for i in where], names, box)
        for j, i in enumerate(where):
            out[i] = draws[:, j]
    return out


# --- the fit ---


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
) -> dict:
    """Fit k molecules jointly (5 LTE parameters each) to the windows (§3, §4, §7).

    Args:
        windows: observed windows (observed frame); the losses of the windows add up.
        molecules: lte.Molecule list; their intensities are summed.
        method: a key of METHODS, or "auto": nn+slsqp when a policy is available (`policy`, or
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
    method, note = resolve_method(method, policy)
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
    box = make_box(names, bounds, fix)
    if not box["free"].any():
        raise ValueError("every parameter is fixed: nothing to fit (use the model command)")
    objective = Problem(windows, molecules, box, loss, v_lsr_kms, dish_m)

    rng = np.random.default_rng(seed)
    n_free = int(box["free"].sum())
    kw, fallback = {}, ""
    if method.startswith("nn"):
        if starts is None:
            propose, fallback = policy_sampler(
                policy or DEFAULT_POLICY, objective.windows, molecules, box, seed
            )
        elif isinstance(starts, str):  # policy_starts said why the network cannot propose
            propose, fallback = None, starts
        else:
            propose = lambda n: starts[:n]  # noqa: E731  drawn elsewhere (policy_starts)
        if propose is None:  # outside what the network knows: random starts, same refinement
            method = {"nn": "random+slsqp", "nn+stack+slsqp": "stack+slsqp"}.get(
                method, method.replace("nn", "random")
            )
        else:
            kw["propose"] = propose
    u, best, nfev, status = METHODS[method](
        objective, n_free, n_init, rng, n_restarts=pso_restarts, n_refine=n_refine, **kw
    )
    assert nfev == objective.nfev, (nfev, objective.nfev)  # every model run is counted
    resid = objective.resid
    polish, resid_fit = None, resid
    resid_x = objective.resid_x
    if loss == "pm" and chi2_refine:  # issue 14: values and errors of one chi2 minimum
        u_ls, keep, polish = chi2_polish(resid, resid_x, u, box)
        if polish["n_dropped"] <= FOREST_DROP * keep.size:
            u, resid_fit = u_ls, (lambda U: resid(U)[:, keep])  # noqa: E731
        else:  # a line forest: the explained channels are a biased choice (see FOREST_DROP)
            polish["kept_pm"] = (f"{polish['n_dropped']} of {keep.size} channels unexplained "
                                 "(a line forest): the pm values are kept, and their errors are "
                                 "the chi2 curvature there, a lower bound")  # fmt: skip
    free_names = [n for n, f in zip(box["names"], box["free"]) if f]
    sigma_u, notes_u, nfev_err = gauss_newton_errors(resid_fit, u, free_names)

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
    tau_max = {
        m.name: max(float(lte.peak_opacity(w.freq_MHz, lines[k], X[5 * k : 5 * k + 5]))
                    for w, lines in zip(objective.windows, objective.lines))
        for k, m in enumerate(molecules)
    }  # fmt: skip
    remarks_thin = {
        5 * k + i: f"nearly thin lines (peak tau {tau_max[m]:.2g}): eta and N_tot trade off along "
        "a valley that is not quadratic, so this error may be far too small"
        for k, m in enumerate(names)
        if tau_max[m] < NEARLY_THIN_TAU and box["free"][5 * k] and box["free"][5 * k + 2]
        for i in (0, 2)
    }
    per_mol = lambda a: {m: dict(zip(PARAM_NAMES, map(float, a[5 * k : 5 * k + 5])))  # noqa: E731
                         for k, m in enumerate(names)}  # fmt: skip
    result = dict(
        params=per_mol(X),
        errors=per_mol(sigma),
        error_notes={m: {} for m in names},
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
    for i, reason in {**remarks_thin, **notes}.items():  # why NaN, else a warning
        result["error_notes"][names[i // 5]][PARAM_NAMES[i % 5]] = reason
    # --- issue 15: faces of the box, detection and upper limits on N_tot ---
    result["at_bound"] = {m: {PARAM_NAMES[i % 5]: side for i, side in at_bound.items()
                              if i // 5 == k} for k, m in enumerate(names)}  # fmt: skip
    result["chi2_refine"] = polish
    result["detection"] = {m: detect_and_limit(resid_x, X, k, box) for k, m in enumerate(names)}
    if dish_m:
        nu_ref = objective.nu_ref
        beam_ref = 1.22 * lte.C_KMS * 1e3 / (nu_ref * 1e6 * dish_m) * 206264.806  # arcsec
        eta = X[0::5]
        result["source_size_arcsec"] = dict(
            zip(names, map(float, beam_ref * np.sqrt(eta / (1 - eta))))
        )
        result["eta_ref_MHz"] = nu_ref
    return result


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
                     dchi2_min: float = DETECT_DCHI2, step_dex: float = 0.1) -> dict:  # fmt: skip
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
        return np.sum(resid_x(XB) ** 2, axis=1)

    chi2_all = chi2(np.concatenate([[-np.inf], grid]))
    chi2_zero, chi2_grid = chi2_all[0], chi2_all[1:]
    x_up, chi2_min, nfev = profile_crossing(chi2, grid, n_sigma**2, chi2_zero, chi2_grid)
    best = float(10 ** grid[np.argmin(chi2_grid)]) if chi2_grid.min() < chi2_zero else 0.0
    held = {p: float(X[5 * k + j]) for j, p in enumerate(PARAM_NAMES) if p != "N_tot"}
    return dict(dchi2=float(chi2_zero - chi2_min), detected=bool(chi2_zero - chi2_min >= dchi2_min),
                N_tot_upper=float(10**x_up) if np.isfinite(x_up) else float("nan"),
                N_tot_best=best, n_sigma=n_sigma, held=held, nfev=nfev + grid.size + 1)  # fmt: skip


def limit_text(mol: str, det: dict) -> str:
    """One line on a molecule's detection, and its N_tot upper limit when not detected."""
    if det["detected"]:
        return f"detection[{mol}]: detected (dchi2={det['dchi2']:.4g} >= {DETECT_DCHI2:g})"
    held = ", ".join(f"{p}={v:.4g}" for p, v in det["held"].items())
    limit = (f"N_tot < {det['N_tot_upper']:.3g} cm-2 ({det['n_sigma']:g} sigma, with {held})"
             if np.isfinite(det["N_tot_upper"]) else "no upper limit (chi2 never rises by "
             f"{det['n_sigma'] ** 2:g} within the scan: lines saturate at {held})")  # fmt: skip
    return f"detection[{mol}]: not detected (dchi2={det['dchi2']:.3g} < {DETECT_DCHI2:g}): {limit}"


def model_windows(
    windows: list[Window],
    molecules: list,
    params: dict,
    v_lsr_kms: float = 0.0,
    dish_m: float | None = None,
) -> list[np.ndarray]:
    """Summed LTE model per window at params {mol: {eta, T_ex, N_tot, delta_v, v_off}}.

    Returns:
        list of (C,) arrays, K, one per window (eta is the value at the data centre if dish_m).
    """
    X = np.array([[params[m.name][p] for p in PARAM_NAMES] for m in molecules]).reshape(1, -1)
    names = [m.name for m in molecules]
    fix = {f"{n}:{p}": X[0, 5 * k + i] for k, n in enumerate(names)
           for i, p in enumerate(PARAM_NAMES)}  # fmt: skip
    fit = Problem(windows, molecules, make_box(names, fix=fix), "chi2", v_lsr_kms, dish_m)
    back = [np.argsort(np.argsort(np.asarray(w.freq_MHz), kind="stable")) for w in windows]
    return [T[0][order] for T, order in zip(fit.model(X), back)]  # in each file's own order


# --- command line ---


GAP_CHANNELS = 3.0  # a step this many local channel widths long starts a new window
WIDTH_CHANGE = 1.25  # so does a change of channel width by more than this factor


def read_spec(
    path: str, rms_K: float | None = None, T_bg_K: float = 0.0, beam_arcsec: float | None = None
) -> Window:
    """A SPEC file of one window (two columns: frequency MHz, brightness K) as a Window.

    Raises:
        FileNotFoundError: no such file.
        ValueError: those of read_spec_windows, or a file of several windows (read it with
            read_spec_windows).
    """
    windows, why = read_spec_windows(path, rms_K, T_bg_K, beam_arcsec)
    if len(windows) > 1:
        raise ValueError(f"SPEC file {path} holds {len(windows)} windows ({why}): read it with "
                         "read_spec_windows")  # fmt: skip
    return windows[0]


def read_spec_windows(
    path: str, rms_K: float | None = None, T_bg_K: float = 0.0, beam_arcsec: float | None = None
) -> tuple[list[Window], str]:
    """A SPEC file (two columns: frequency MHz, brightness K; # comments) as its windows.

    Several spectral windows exported into one file are split where the frequency jumps by
    more than GAP_CHANNELS channel widths, or where the channel width changes by more than a
    factor WIDTH_CHANGE (split_windows); each window gets its own noise estimate unless rms_K
    is given.

    Returns:
        (windows, why): why says where and why the file was split ("" for one window).
    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not two finite numbers (the message gives the line number),
            fewer than 3 rows, or frequencies not strictly monotonic.
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"SPEC file {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"SPEC file {path} cannot be read as text ({err})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 2:
            raise ValueError(f"SPEC file {path} line {n}: expected two finite columns (MHz, K), "
                             f"got {line.strip()!r}")  # fmt: skip
        try:
            row = (float(words[0]), float(words[1]))
        except ValueError:
            raise ValueError(f"SPEC file {path} line {n}: expected two numeric columns (MHz, K), "
                             f"got {line.strip()!r}") from None  # fmt: skip
        if not all(map(math.isfinite, row)):
            raise ValueError(f"SPEC file {path} line {n}: {line.strip()!r} is not finite; "
                             "expected two finite columns (MHz, K): drop or fill blanked "
                             "channels")  # fmt: skip
        rows.append(row)
    if len(rows) < 3:
        raise ValueError(f"SPEC file {path}: expected >= 3 rows of two finite columns (MHz, K), "
                         f"got {len(rows)}")  # fmt: skip
    freq, T = np.array(rows).T
    step = np.diff(freq)
    if not ((step > 0).all() or (step < 0).all()):
        raise ValueError(f"SPEC file {path}: frequencies must be strictly increasing or decreasing")
    bounds, why = split_windows(freq)
    if any(b - a < 3 for a, b in bounds):
        raise ValueError(f"SPEC file {path}: a window of fewer than 3 channels ({why})")
    windows = [Window(freq[a:b], T[a:b], estimate_rms(T[a:b]) if rms_K is None else rms_K,
                      T_bg_K, beam_arcsec) for a, b in bounds]  # fmt: skip
    return windows, why


def split_windows(freq_MHz: np.ndarray) -> tuple[list[tuple[int, int]], str]:
    """(start, stop) channels of the windows of a monotonic frequency grid, and why it was split.

    The local channel width is the running median of 5 steps; a new window starts after a step
    longer than GAP_CHANNELS local widths (a gap) and where the local width changes by more
    than a factor WIDTH_CHANGE (ours). Rounded frequencies (steps of 0.12 and 0.13 MHz) and
    grids uniform in velocity stay one window.
    """
    from scipy.ndimage import median_filter

    width = np.abs(np.diff(freq_MHz))
    local = median_filter(width, size=5, mode="nearest")
    gaps = set(np.flatnonzero(width > GAP_CHANNELS * local))
    ratio = local[1:] / local[:-1]
    changes = set()
    for i in 1 + np.flatnonzero((ratio > WIDTH_CHANGE) | (ratio < 1 / WIDTH_CHANGE)):
        # the junction is the step (i - 1 or i) least like the widths on either side
        unlike = [min(abs(np.log(width[k] / local[i - 1])), abs(np.log(width[k] / local[i])))
                  for k in (i - 1, i)]  # fmt: skip
        changes.add(i - 1 if unlike[0] >= unlike[1] else i)
    changes = {i for i in changes if not gaps & {i - 1, i, i + 1}}  # a gap there already splits
    cuts = sorted(gaps | changes)
    edges = [0, *(i + 1 for i in cuts), freq_MHz.size]
    after = lambda i: local[min(i + 1, local.size - 1)]  # noqa: E731
    notes = [f"gap of {width[i]:.4g} MHz" if i in gaps else
             f"channel width {local[i - 1]:.4g} -> {after(i):.4g} MHz" for i in cuts]  # fmt: skip
    notes = [f"{note} after {freq_MHz[i]:.4f} MHz" for note, i in zip(notes, cuts)]
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])], "; ".join(notes)


def estimate_rms(T_K: np.ndarray, n_sigma: float = 3.0, n_iter: int = 20) -> float:
    """Noise of a spectrum from its line-free channels (ours).

    Lines are the channels further than n_sigma x sigma from the median of the line-free ones,
    each run of them widened by half its length (at least 2 channels) on either side for the
    wings below the threshold; sigma is the standard deviation of the other channels divided by
    that of a unit normal cut at +-c = n_sigma, sqrt(1 - 2 c phi(c) / erf(c / sqrt 2)) (0.9866
    at c = 3; the truncated normal), iterated until the mask settles. The
    start, and the answer when under 20 % of the channels are line-free (a line forest), is the
    sigma-clipped MAD of the second differences / sqrt(6), which lines wider than a few channels
    do not inflate (on the IRAS 16293-2422 B windows it is within 20 % of the archive rms).
    Both assume uncorrelated channels; the first also a flat baseline (continuum subtracted or
    constant).
    """
    T_K = np.asarray(T_K, dtype=float)
    c = n_sigma
    cut = np.sqrt(1 - 2 * c * np.exp(-c * c / 2) / np.sqrt(2 * np.pi) / math.erf(c / np.sqrt(2)))
    sigma = sigma_d2 = _rms_second_differences(T_K, n_sigma, n_iter)
    free = np.ones(T_K.size, bool)
    for _ in range(n_iter):
        line = np.abs(T_K - np.median(T_K[free])) > n_sigma * sigma
        edges = np.flatnonzero(np.diff(np.concatenate([[0], line.astype(np.int8), [0]])))
        new = np.ones(T_K.size, bool)
        for a, b in zip(edges[::2], edges[1::2]):
            grow = max(2, -(-(b - a) // 2))
            new[max(0, a - grow) : b + grow] = False
        if new.sum() < max(16, 0.2 * T_K.size):
            return sigma_d2
        sigma = float(np.std(T_K[new]) / cut)
        if (new == free).all():
            break
        free = new
    return sigma


def _rms_second_differences(T_K: np.ndarray, n_sigma: float, n_iter: int) -> float:
    """Sigma-clipped MAD of the second differences of T_K / sqrt(6)."""
    d2 = T_K[:-2] - 2 * T_K[1:-1] + T_K[2:]
    keep = np.ones(d2.size, bool)
    for _ in range(n_iter):
        med = np.median(d2[keep])
        sigma = 1.4826 * np.median(np.abs(d2[keep] - med))
        new = np.abs(d2 - med) < n_sigma * sigma
        if (new == keep).all():
            break
        keep = new
    return float(sigma / np.sqrt(6))


def parse_assignments(items: list[str], ranged: bool) -> dict:
    """["NAME=LO:HI", ...] (ranged) or ["NAME=VALUE", ...] -> {NAME: (lo, hi) or value}.

    Raises:
        ValueError: an item not of that form.
    """
    out = {}
    for item in items:
        key, _, val = item.rpartition("=")
        try:
            parts = [float(v) for v in val.split(":")]
            assert len(parts) == (2 if ranged else 1) and key
        except (ValueError, AssertionError):
            form = "[MOL:]NAME=LO:HI" if ranged else "[MOL:]NAME=VALUE"
            raise ValueError(f"{item!r}: expected {form} with numbers") from None
        out[key] = tuple(parts) if ranged else parts[0]
    return out


def plot_fit(path: str, windows: list[Window], models: list[np.ndarray], title: str) -> None:
    """Per window: data, model and residual (offset below), whole and +-25 km/s around the
    brightest model line; saved to path."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 1.9 * len(windows) + 0.6), layout="constrained")
    axes = fig.subplots(len(windows), 2, squeeze=False, width_ratios=(3, 1))
    for (ax_all, ax_zoom), w, m in zip(axes, windows, models):
        f0 = w.freq_MHz[np.argmax(m)]
        near = np.abs(w.freq_MHz - f0) < 25.0 / lte.C_KMS * f0
        offset = 0.4 * np.abs(w.T_obs_K).max()
        for ax, sel in ((ax_all, slice(None)), (ax_zoom, near)):
            f = w.freq_MHz[sel]
            ax.plot(f, w.T_obs_K[sel], "k", lw=0.5, drawstyle="steps-mid", label="data")
            ax.plot(f, m[sel], "C3", lw=0.8, label="model")
            ax.plot(f, w.T_obs_K[sel] - m[sel] - offset, "C0", lw=0.5, label="residual - offset")
        ax_all.set_ylabel("T [K]")
    for ax in axes.ravel():
        ax.ticklabel_format(useOffset=False)
    ax_all.set_xlabel("observed frequency [MHz]")
    ax_zoom.set_xlabel("observed frequency [MHz] (+-25 km/s)")
    ax_zoom.legend(loc="upper right", fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)


def field_helps(cls) -> dict:
    """{field: help} from a dataclass's trailing comments, with their continuation lines."""
    helps, last = {}, None
    for line in inspect.getsource(cls).splitlines():
        field_line = re.match(r"    (\w+):[^#]*#\s*(.*)$", line)
        more = re.match(r"\s*#\s*(.*)$", line)
        if field_line:
            last, helps[field_line[1]] = field_line[1], field_line[2]
        elif more and last:
            helps[last] += " " + more[1]
        else:
            last = None
    return helps


def parse_config(argv: list[str] | None = None) -> Config:
    """Config from the command line: one option per field, help and default from its comment."""
    helps = field_helps(Config)
    parser = argparse.ArgumentParser(
        prog="spectuner.py", add_help=False, description=__doc__.split("\n\n")[0]
        + "\n\nPut the SPEC files before the options: an option that takes several values\n"
        "(--mol, --rms, --bounds, --fix) takes every word after it.",
        usage="%(prog)s fit SPEC [SPEC ...] --mol M [M ...] [options]\n"
              "       %(prog)s model [SPEC ...] --mol M --fix NAME=VALUE ... [options]",
        epilog="examples:\n" + __doc__.split("\n\n", 2)[2].replace("%", "%%"),
        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    required = parser.add_argument_group("required (SPEC files before the options)")
    required.add_argument("command", choices=("fit", "model"), help=helps["command"])
    required.add_argument("spec", nargs="*", metavar="SPEC", help=helps["spec"])
    options = parser.add_argument_group("options")
    options.add_argument("-h", "--help", action="help", help="show this help and exit")
    for f in dataclasses.fields(Config)[2:]:
        if f.type.startswith("list"):
            kind = dict(nargs="+", action="extend", type=float if "float" in f.type else str,
                        default=[], metavar=f.name.upper())  # fmt: skip
        else:
            kind = dict(type=type(f.default), default=f.default)
        shown = (
            "none" if kind["default"] == [] else repr(f.default) if f.default == "" else f.default
        )
        text = f"{helps[f.name]} (default: {shown})"
        text = f"required: {helps[f.name]}" if f.name == "mol" else text
        group = required if f.name == "mol" else options
        group.add_argument(f"--{f.name}", help=text.replace("%", "%%"), **kind)
    return Config(**vars(parser.parse_args(argv)))


def main(cfg: Config) -> dict:
    """Run `fit` (fit, print the table, write JSON and plot) or `model` (write spectra)."""
    # --- data ---
    if not cfg.mol:
        raise ValueError("no molecule: give --mol NAME (e.g. --mol CH3OH)")
    if cfg.beam_arcsec and cfg.dish_m:
        raise ValueError("give --beam_arcsec (interferometer) or --dish_m (single dish), not both")
    if cfg.rms and len(cfg.rms) not in (1, len(cfg.spec)):
        raise ValueError(
            f"--rms has {len(cfg.rms)} values for {len(cfg.spec)} SPEC files; "
            "expected one per file (or one for all)"
        )
    if cfg.n_init < 1:
        raise ValueError(f"--n_init {cfg.n_init}: expected a number of starts >= 1")
    rms = (cfg.rms * len(cfg.spec) if len(cfg.rms) == 1 else cfg.rms) or [None] * len(cfg.spec)
    beam = cfg.beam_arcsec or None
    windows = []
    for path, rms_K in zip(cfg.spec, rms):
        found, why = read_spec_windows(path, rms_K, cfg.T_bg_K, beam)
        if why:
            print(f"note: SPEC file {path} split into {len(found)} windows: {why}", file=sys.stderr)
        windows += found
    if len(windows) > len(cfg.spec):
        print(f"windows={len(windows)} from {len(cfg.spec)} SPEC files", file=sys.stderr)
    if cfg.command == "model" and not windows:
        try:
            lo, hi, n = (float(v) for v in cfg.freq_MHz.split(":"))
        except ValueError:
            raise ValueError(f"--freq_MHz {cfg.freq_MHz!r}: expected LO:HI:N") from None
        windows = [Window(np.linspace(lo, hi, int(n)), np.zeros(int(n)), 1.0, cfg.T_bg_K, beam)]
    if not windows:
        raise ValueError("no SPEC file given (fit needs SPEC files; model SPEC or --freq_MHz)")
    f_all = np.concatenate([w.freq_MHz for w in windows]) * (1 + cfg.v_lsr / lte.C_KMS)
    f_range = (f_all.min() * (1 - 1e-3), f_all.max() * (1 + 1e-3))  # +-300 km/s of lines
    molecules = [
        lte.load_molecule(m, catalog=cfg.catalog or None, freq_range_MHz=f_range) for m in cfg.mol
    ]
    fix, dish = parse_assignments(cfg.fix, ranged=False), cfg.dish_m or None
    if cfg.command == "model":
        # --- model ---
        box = make_box([m.name for m in molecules], fix=fix)
        if box["free"].any():
            missing = [n for n, f in zip(box["names"], box["free"]) if f]
            raise ValueError(f"model needs --fix for every parameter; missing: {missing}")
        X = to_physical(np.zeros((1, 0)), box)[0]
        params = {
            m.name: dict(zip(PARAM_NAMES, X[5 * k : 5 * k + 5])) for k, m in enumerate(molecules)
        }
        rng = np.random.default_rng(cfg.seed)
        models = model_windows(windows, molecules, params, cfg.v_lsr, dish)
        for i, (w, T) in enumerate(zip(windows, models)):
            noise = rng.normal(0.0, cfg.rms[min(i, len(cfg.rms) - 1)], T.size) if cfg.rms else 0
            out = Path(cfg.out)
            out = out if len(windows) == 1 else out.with_stem(f"{out.stem}_{i}")
            np.savetxt(out, np.column_stack([w.freq_MHz, T + noise]), fmt="%.9e")
            print(f"wrote={out} n_chan={T.size} peak_K={T.max():.4g}")
        return params
    # --- fit ---
    res = fit_spectrum(
        windows,
        molecules,
        cfg.method,
        cfg.loss,
        cfg.n_init,
        cfg.seed,
        parse_assignments(cfg.bounds, ranged=True),
        fix,
        cfg.v_lsr,
        dish,
        policy=cfg.policy or None,
        pso_restarts=cfg.pso_restarts,
        n_refine=cfg.n_refine,
    )
    for key in ("note", "fallback"):
        if res[key]:
            print(f"{key}: {res[key]}", file=sys.stderr)
    # --- save ---
    for name in res["params"]:
        for p in PARAM_NAMES:
            note = res["error_notes"][name].get(p, "")
            print(
                f"{name:>10s} {p:>8s} = {res['params'][name][p]:11.4g} +- "
                f"{res['errors'][name][p]:9.3g}  {note}"
            )
    print(
        " ".join(
            f"{k}={res[k]:.6g}" if isinstance(res[k], float) else f"{k}={res[k]}"
            for k in ("loss", "nfev", "time_s", "method", "loss_name", "status")
        ),
        " ".join(f"tau_max[{m}]={t:.3g}" for m, t in res["tau_max"].items()),
    )
    if res["chi2_refine"]:  # issue 14: the pm optimum refined by least squares
        c = res["chi2_refine"]
        print(f"chi2_refine: chi2 {c['chi2_pm']:.6g} -> {c['chi2']:.6g} on {c['n_chan']} channels "
              f"({c['n_dropped']} unexplained left out) nfev={c['nfev']}")  # fmt: skip
        if "kept_pm" in c:
            print(f"chi2_refine not applied: {c['kept_pm']}")
    for name, det in res["detection"].items():  # issue 15: detections and upper limits
        print(limit_text(name, det))
    for name, flags in res["at_bound"].items():
        for p, side in flags.items():
            print(f"at_bound[{name}:{p}]={side}: {res['error_notes'][name][p]}")
    if cfg.json:
        nan_to_none = lambda v: None if np.isnan(v) else v  # noqa: E731
        mols = {
            m: {
                **res["params"][m],
                **{f"{p}_err": nan_to_none(e) for p, e in res["errors"][m].items()},
            }
            for m in res["params"]
        }
        out = dict(
            molecules=mols,
            **{
                k: res[k]
                for k in ("loss", "nfev", "method", "loss_name", "time_s", "status", "error_notes")
                + ("tau_max", "source_size_arcsec", "eta_ref_MHz", "at_bound", "chi2_refine")
                if k in res
            },
            detection={
                m: {k: nan_to_none(v) if isinstance(v, float) else v for k, v in d.items()}
                for m, d in res["detection"].items()
            },  # fmt: skip
            config=dataclasses.asdict(cfg),
        )
        with open(cfg.json, "w") as fh:
            json.dump(out, fh, indent=2)
    if cfg.plot:
        models = model_windows(windows, molecules, res["params"], cfg.v_lsr, dish)
        title = f"{'+'.join(cfg.mol)}: {res['method']}, loss={cfg.loss} ({res['loss']:.4g})"
        plot_fit(cfg.plot, windows, models, title)
    return res


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry: bad input ends with `error: ...` and exit code 2, no traceback."""
    cfg = parse_config(argv)
    try:
        main(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
