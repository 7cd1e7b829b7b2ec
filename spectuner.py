"""Fit one spectrum with the LTE model from the command line: `fit` SPEC files, or `model`.

The fit is fitting.fit_spectrum (docs/method.md §3 unit cube over the parameter box, problem.py;
§4 chi2 and peak-matching losses, losses.py; §7 best of N_init starts refined by SLSQP or
Nelder-Mead, particle swarm, matched filter or policy network, methods.py; the 1-sigma errors of
issue 3 and the limits of issue 15, uncertainty.py), for Qiu et al., arXiv:2511.21027
(Spectuner-D1) and Spectuner (ApJS 277, 21). SPEC files are read by spectra.py and the outputs
made by report.py. The names that fit_cube, train, evaluate and bench use are re-exported here
(spectuner.fit_spectrum, spectuner.read_spec, spectuner.METHODS, ...).

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

import numpy as np

import lte
from fitting import fit_spectrum
from losses import LOSSES, PEAK_SIGMA, find_spans, fp_weight, loss_chi2, loss_pm  # noqa: F401
from methods import (  # noqa: F401  (re-exported: spectuner.METHODS, spectuner.policy_starts, ...)
    DEFAULT_POLICY,
    METHODS,
    line_table,
    load_policy,
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
from report import model_windows, plot_fit, result_json, result_lines, write_spectra
from spectra import (  # noqa: F401  (re-exported: spectuner.read_spec, spectuner.estimate_rms, ...)
    estimate_rms,
    parse_assignments,
    read_spec,
    read_spec_files,
    read_spec_windows,
)
from uncertainty import (  # noqa: F401  (re-exported: spectuner.detect_and_limit, ...)
    DETECT_DCHI2,
    LIMIT_SIGMA,
    NEARLY_THIN_TAU,
    chi2_polish,
    detect_and_limit,
    noise_residuals,
    residuals_at,
    unexplained_channels,
)


@dataclasses.dataclass
class Config:
    command: str = "fit"  # fit (fit SPEC files) or model (write a model spectrum)
    spec: list[str] = dataclasses.field(default_factory=list)  # SPEC files: freq MHz, T K columns
    mol: list[str] = dataclasses.field(default_factory=list)  # required: molecule names or
    # catalogue paths
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
    maxiter: int = 100  # SLSQP iterations per refinement (fit_cube.py --maxiter)
    seed: int = 0  # seeds every random draw
    json: str = ""  # write the result here (JSON); "" = do not
    plot: str = ""  # draw data, model and residual per window here (PNG); "" = do not
    freq_MHz: str = ""  # model: LO:HI:N channel grid, used when no SPEC file is given
    out: str = "model.txt"  # model: output spectrum (freq MHz, T K); _i suffix for several grids


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
    """The windows of the SPEC files, or for `model` without SPEC files the --freq_MHz grid.

    Raises:
        ValueError: a bad --freq_MHz, no SPEC file, and those of spectra.read_spec_windows.
    """
    rms = cfg.rms * len(cfg.spec) if len(cfg.rms) == 1 else cfg.rms
    beam = cfg.beam_arcsec or None
    windows = read_spec_files(cfg.spec, rms, cfg.T_bg_K, beam)
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
    models = model_windows(windows, molecules, params, cfg.v_lsr, dish_m)
    write_spectra(cfg.out, windows, models, cfg.rms, cfg.seed)
    return params


def config_parser(cls, positional=(), options=None, **parser_kw) -> argparse.ArgumentParser:
    """An argparse parser made from a Config dataclass (the same helper is in every script).

    One argument per field: the type from the annotation or the default, bools as --name /
    --no-name flags, lists as nargs="+", the help from the field's trailing comment and its
    continuation comment lines, then the default. Fields in `positional` are positional (lists
    take any number of words); `options` adds argparse keywords per field (choices, required).
    """
    helps, last = {}, None
    for line in inspect.getsource(cls).splitlines():
        field = re.match(r"    (\w+):[^#]*?(?:#\s*(.*))?$", line)
        more = re.match(r"\s*#\s*(.*)$", line)
        if more and last:
            helps[last] += " " + more[1]
        elif field and not line.lstrip().startswith(("@", "class", "def")):
            last, helps[field[1]] = field[1], field[2] or ""
    parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter,
                                     **parser_kw)  # fmt: skip
    types = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        kind = dict(type=types.get(name, type(default)))
        if isinstance(default, bool):
            kind = dict(action=argparse.BooleanOptionalAction)
        elif isinstance(default, list):
            elem = type(default[0]) if default else next(
                (t for k, t in types.items() if f"[{k}]" in str(f.type)), str)  # fmt: skip
            kind = dict(type=elem, nargs="*" if f.name in positional else "+")
        elif f.name in positional:
            kind["nargs"] = "?"
        kind.update((options or {}).get(f.name, {}))
        text = helps.get(f.name, "").replace("%", "%%")
        if f.name in positional:
            parser.add_argument(f.name, default=default, help=text, **kind)
        else:
            shown = " ".join(map(str, default)) or "none" if isinstance(default, list) else \
                repr(default) if default == "" else default  # fmt: skip
            text += "" if kind.get("required") else f" (default: {shown})"
            parser.add_argument(f"--{f.name}", default=default, help=text, **kind)
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    """Config from the command line (config_parser): the command and SPEC files, then options."""
    extend = dict(action="extend")  # --mol A --mol B gives both, as does --mol A B
    parser = config_parser(
        Config, positional=("command", "spec"), prog="spectuner.py",
        options=dict(command=dict(choices=("fit", "model"), nargs=None),
                     spec=dict(metavar="SPEC"), mol=extend, rms=extend, bounds=extend, fix=extend),
        description=__doc__.split("\n\n")[0]
        + "\n\nRequired: the command and --mol (fit: SPEC files too). Put the SPEC files before "
        "the options:\nan option that takes several values (--mol, --rms, --bounds, --fix) "
        "takes every word after it.",
        usage="%(prog)s fit SPEC [SPEC ...] --mol M [M ...] [options]\n"
              "       %(prog)s model [SPEC ...] --mol M --fix NAME=VALUE ... [options]",
        epilog="examples:\n" + __doc__.split("\n\n", 2)[2].replace("%", "%%"))  # fmt: skip
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
        maxiter=cfg.maxiter,
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
