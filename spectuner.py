"""Fit one spectrum with the LTE model: `fit_spectrum` and the command line (`fit`, `model`).

Implements docs/method.md §3 (unit cube over the parameter box, problem.py), §4 (chi2 and
peak-matching losses, losses.py), §7 (best of N_init starts refined by SLSQP or Nelder-Mead;
particle swarm, optionally polished by the same local optimisers, ours: methods.py) and the
1-sigma errors of issue 3 (uncertainty.py), for Qiu et al., arXiv:2511.21027 (Spectuner-D1) and
Spectuner (ApJS 277, 21). SPEC files, model spectra and the outputs are in spectra.py; the names
that train, fit_cube, evaluate and bench use are re-exported here (spectuner.read_spec, ...).

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
import re
import sys
import time
from pathlib import Path

import numpy as np

import lte
from losses import LOSSES, PEAK_SIGMA, find_spans, fp_weight, loss_chi2, loss_pm  # noqa: F401
from methods import (  # noqa: F401  (re-exported: spectuner.METHODS, spectuner.policy_starts, ...)
    DEFAULT_POLICY,
    METHODS,
    line_table,
    load_policy,
    network_starts,
    policy_starts,
    resolve_method,
    run_pso,
    run_random_local,
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
from spectra import (  # noqa: F401  (re-exported: spectuner.read_spec, spectuner.estimate_rms, ...)
    estimate_rms,
    model_windows,
    parse_assignments,
    plot_fit,
    read_spec,
    read_spec_windows,
    result_json,
    result_lines,
)
from uncertainty import (  # noqa: F401  (re-exported: spectuner.detect_and_limit, ...)
    DETECT_DCHI2,
    LIMIT_SIGMA,
    NEARLY_THIN_TAU,
    detect_and_limit,
    noise_residuals,
    physical_errors,
    polish_pm,
    residuals_at,
    thin_remarks,
    unexplained_channels,
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
    # --- the problem: method, box and objective (§3, §4) ---
    method, note = resolve_method(method, policy)
    names = _check_fit(method, loss, molecules, n_refine)
    box = make_box(names, bounds, fix)
    if not box["free"].any():
        raise ValueError("every parameter is fixed: nothing to fit (use the model command)")
    objective = Problem(windows, molecules, box, loss, v_lsr_kms, dish_m)
    # --- starts and local refinement (§7) ---
    rng = np.random.default_rng(seed)
    n_free = int(box["free"].sum())
    method, kw, fallback = network_starts(
        method, starts, policy, objective.windows, molecules, box, seed
    )
    u, best, nfev, status = METHODS[method](
        objective, n_free, n_init, rng, n_restarts=pso_restarts, n_refine=n_refine, **kw
    )
    assert nfev == objective.nfev, (nfev, objective.nfev)  # every model run is counted
    # --- values and errors of one chi2 minimum (issues 3, 14) ---
    polish, resid_fit = None, objective.resid
    if loss == "pm" and chi2_refine:
        u, resid_fit, polish = polish_pm(objective.resid, objective.resid_x, u, box)
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
        m: detect_and_limit(objective.resid_x, X, k, box) for k, m in enumerate(names)
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


# --- command line ---


def check_config(cfg: Config) -> None:
    """Refuse a command line that cannot run, before any file is read.

    Raises:
        ValueError: no --mol, both --beam_arcsec and --dish_m, an --rms count that is neither
            one nor one per SPEC file, or --n_init < 1.
    """
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


def read_windows(cfg: Config) -> list[Window]:
    """The windows of the SPEC files (their notes on stderr), or for `model` without SPEC files
    the --freq_MHz grid.

    Raises:
        ValueError: a bad --freq_MHz, no SPEC file, and those of spectra.read_spec_windows.
    """
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
    return windows


def load_molecules(cfg: Config, windows: list[Window]) -> list:
    """The --mol molecules, their lines cut to the rest-frame range of the windows +- 0.1 %."""
    f_all = np.concatenate([w.freq_MHz for w in windows]) * (1 + cfg.v_lsr / lte.C_KMS)
    f_range = (f_all.min() * (1 - 1e-3), f_all.max() * (1 + 1e-3))  # +-300 km/s of lines
    return [
        lte.load_molecule(m, catalog=cfg.catalog or None, freq_range_MHz=f_range) for m in cfg.mol
    ]


def write_model(cfg: Config, windows: list, molecules: list, fix: dict, dish_m) -> dict:
    """The `model` command: the spectrum at the --fix values (plus noise of --rms) per window,
    written to --out (an _i suffix for several); returns the parameters {mol: {name: value}}.

    Raises:
        ValueError: a parameter without --fix.
    """
    box = make_box([m.name for m in molecules], fix=fix)
    if box["free"].any():
        missing = [n for n, f in zip(box["names"], box["free"]) if f]
        raise ValueError(f"model needs --fix for every parameter; missing: {missing}")
    X = to_physical(np.zeros((1, 0)), box)[0]
    params = {m.name: dict(zip(PARAM_NAMES, X[5 * k : 5 * k + 5])) for k, m in enumerate(molecules)}
    rng = np.random.default_rng(cfg.seed)
    models = model_windows(windows, molecules, params, cfg.v_lsr, dish_m)
    for i, (w, T) in enumerate(zip(windows, models)):
        noise = rng.normal(0.0, cfg.rms[min(i, len(cfg.rms) - 1)], T.size) if cfg.rms else 0
        out = Path(cfg.out)
        out = out if len(windows) == 1 else out.with_stem(f"{out.stem}_{i}")
        np.savetxt(out, np.column_stack([w.freq_MHz, T + noise]), fmt="%.9e")
        print(f"wrote={out} n_chan={T.size} peak_K={T.max():.4g}")
    return params


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
    check_config(cfg)
    windows = read_windows(cfg)
    molecules = load_molecules(cfg, windows)
    fix, dish = parse_assignments(cfg.fix, ranged=False), cfg.dish_m or None
    if cfg.command == "model":
        # --- model ---
        return write_model(cfg, windows, molecules, fix, dish)
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
    for line in result_lines(res):
        print(line)
    if cfg.json:
        with open(cfg.json, "w") as fh:
            json.dump(result_json(res, dataclasses.asdict(cfg)), fh, indent=2)
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
