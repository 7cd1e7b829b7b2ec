"""Reproduce the paper's evaluation (docs/method.md §8): mean relative loss against model runs.

For each spectrum every method fits the same molecule; L_ref is the best loss any run found,
including a particle swarm with several restarts, and a fit's relative loss is
(L - L_ref) / |L_ref|. Groups: synthetic spectra of molecules the network was trained on,
synthetic spectra of held-out molecules (true parameters known), and the real IRAS 16293-2422 B
windows.

    python evaluate.py --n_spectra 200 --out runs/eval            # the full comparison
    python evaluate.py --n_spectra 5 --groups trained --methods random+slsqp pso --out /tmp/e
"""

import argparse
import csv
import dataclasses
import inspect
import json
import re
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

import spectuner
from eval_cases import (  # noqa: F401  (evaluate.synthetic_case, ... for the tests)
    draw_params,
    forest_cases,
    load,
    real_cases,
    strongest_lines,
    synthetic_case,
)  # fmt: skip

SHARED = Path(__file__).resolve().parent.parent / "shared" / "data"


METHODS = ["nn", "nn+slsqp", "nn+nelder-mead", "nn+stack+slsqp", "stack", "stack+slsqp",
           "random+slsqp", "random+nelder-mead", "pso"]  # fmt: skip


def _list(*items):
    return dataclasses.field(default_factory=lambda: list(items))


@dataclasses.dataclass
class Config:
    out: str = "runs/eval"  # output folder: config.json, results.csv, summary.csv, figure.png
    n_spectra: int = 200  # synthetic spectra per group
    groups: list[str] = _list("trained", "heldout", "real")  # of trained, heldout, real,
    # forest_trained, forest_heldout (line forests of forest.py, preset hot_corino, trained /
    # held-out targets)
    trained: list[str] = _list("CH3OH", "CH3CHO", "SO2", "HC3N", "CH3CN")  # molecules of the
    # training set (synthetic group)
    heldout: list[str] = _list("CH3OCHO", "CH3OCH3", "C2H3CN")  # molecules never seen in training
    real_mols: list[str] = _list("CH3OH", "SO2", "OCS", "HC3N")  # molecules fitted on real windows
    real_spw: list[str] = _list("85", "89", "105", "109")  # real windows fitted ("all" = all ten);
    # the default is train.py's real_holdout, the windows never trained on
    real_dir: str = str(SHARED / "spectra" / "iras16293b")  # the real windows (windows.csv and
    # spw*.dat, see ../shared/data/README.md); the real group is skipped when it is absent
    catalog: str = str(SHARED / "catalogs")  # where names other than the bundled CH3OH resolve
    methods: list[str] = _list(*METHODS)  # spectuner.METHODS keys
    nn_n_init: list[int] = _list(10, 25, 50, 100)  # N_init values for the network-only method
    n_init: int = 50  # N_init of every other method
    n_refine: int = 2  # best distinct starts refined by the local methods (spectuner n_refine)
    ref_restarts: int = 3  # particle-swarm restarts of the reference optimum (0 = none)
    inputs: list[str] = _list()  # results.csv files to merge and summarise instead of fitting
    loss: str = "pm"  # pm or chi2
    policy: str = "data/policy.pt"  # trained policy for the nn methods
    window_MHz: float = 250.0  # width of a synthetic window
    snr_range: list[float] = _list(10.0, 100.0)  # peak signal-to-noise of the synthetic spectra,
    # drawn log-uniform between these
    confusion: int = 1  # other molecules added to each synthetic spectrum (line confusion)
    workers: int = 1  # processes; the result does not depend on it
    seed: int = 0  # every draw derives from it


# --- fitting ---


def run_case(args) -> list[dict]:
    """Every method on one case (a worker task); rows of results."""
    group, index, case, cfg = args
    runs = [(m, cfg.n_init) for m in cfg.methods if m != "nn"]
    if "nn" in cfg.methods:
        runs += [("nn", n) for n in cfg.nn_n_init]
    if cfg.ref_restarts > 0:
        runs.append(("reference", cfg.n_init))
    rows = []
    for method, n_init in runs:
        kw = dict(method="pso", pso_restarts=cfg.ref_restarts) if method == "reference" else {}
        seed = cfg.seed * 1_000_003 + index
        try:
            r = spectuner.fit_spectrum(
                case["windows"], [case["mol"]], **{"method": method, **kw}, loss=cfg.loss,
                n_init=n_init, seed=seed, v_lsr_kms=case["v_lsr"], policy=cfg.policy,
                n_refine=cfg.n_refine,
            )  # fmt: skip
        except ValueError as err:  # e.g. no policy: the method is reported as missing
            rows.append(dict(group=group, case=index, method=method, n_init=n_init, error=str(err)))
            continue
        row = dict(group=group, case=index, molecule=case["mol"].name, method=method,
                   n_init=n_init, loss=r["loss"], nfev=r["nfev"], time_s=r["time_s"],
                   used=r["method"], fallback=r["fallback"])  # fmt: skip
        if case["truth"] is not None:
            fit = [r["params"][case["mol"].name][p] for p in spectuner.PARAM_NAMES]
            for name, t, f in zip(spectuner.PARAM_NAMES, case["truth"], fit):
                row[f"err_{name}"] = np.log10(f / t) if name != "v_off" else f - t
        rows.append(row)
    return rows


def relative(rows: list[dict]) -> list[dict]:
    """rel_loss = (L - L_ref) / |L_ref| with L_ref the best loss of any run on the same case."""
    best = {}
    for r in rows:
        if r.get("loss") not in (None, ""):
            key = (r["group"], int(r["case"]))
            best[key] = min(best.get(key, np.inf), float(r["loss"]))
    for r in rows:
        if r.get("loss") not in (None, ""):
            L_ref = best[(r["group"], int(r["case"]))]
            r["rel_loss"] = (float(r["loss"]) - L_ref) / max(abs(L_ref), 1e-12)
    return rows


def summarise(rows: list[dict], within: float = 0.02) -> list[dict]:
    """Mean relative loss (with standard error) and mean nfev per group, method and N_init, and
    the fraction of the spectra where the loss is within `within` (relative) of the PSO run's,
    L <= L_pso + within |L_pso| (issue 12's target; NaN where no PSO run exists)."""
    keys = sorted({(r["group"], r["method"], r["n_init"]) for r in rows if "rel_loss" in r})
    pso = {(r["group"], int(r["case"])): float(r["loss"]) for r in rows
           if r["method"] == "pso" and r.get("loss") not in (None, "")}  # fmt: skip
    out = []
    for g, m, n in keys:
        sel = [r for r in rows if (r["group"], r["method"], r["n_init"]) == (g, m, n)]
        rel = np.array([r["rel_loss"] for r in sel if "rel_loss" in r])
        nfev = np.array([r["nfev"] for r in sel if "nfev" in r])
        ok = [float(r["loss"]) <= pso[key] + within * abs(pso[key]) for r in sel if "rel_loss" in r
              and (key := (r["group"], int(r["case"]))) in pso]  # fmt: skip
        out.append(
            dict(
                group=g,
                method=m,
                n_init=n,
                n=rel.size,
                rel_loss_mean=rel.mean(),
                rel_loss_sem=rel.std(ddof=1) / np.sqrt(rel.size) if rel.size > 1 else 0.0,
                rel_loss_median=float(np.median(rel)),
                nfev_mean=nfev.mean(),
                time_s_mean=np.mean([r["time_s"] for r in sel if "time_s" in r]),
                within_2pct_of_pso=float(np.mean(ok)) if ok else float("nan"),
            )
        )
    # fmt: skip
    return out


def plot(summary: list[dict], path: Path) -> None:
    """Relative loss against nfev, log x, one panel per group (matplotlib, if installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot=skipped reason='matplotlib is not installed'")
        return
    groups = sorted({s["group"] for s in summary})
    ncol = min(3, len(groups))
    nrow = -(-len(groups) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 4 * nrow), squeeze=False)
    labels = sorted({f"{s['method']} ({s['n_init']})" if s["method"] == "nn" else s["method"]
                     for s in summary})  # fmt: skip
    style = {lab: (plt.cm.tab20(i % 20), "osD^v<>ph*"[i % 10]) for i, lab in enumerate(labels)}
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, g in zip(axes.flat, groups):
        for s in (s for s in summary if s["group"] == g and s["method"] != "reference"):
            label = f"{s['method']} ({s['n_init']})" if s["method"] == "nn" else s["method"]
            color, marker = style[label]
            ax.errorbar(s["nfev_mean"], s["rel_loss_mean"], yerr=s["rel_loss_sem"], fmt=marker,
                        color=color, capsize=3, label=label)  # fmt: skip
        ax.set(xscale="log", xlabel="mean forward-model runs per fit",
               ylabel="mean relative loss", title=g)  # fmt: skip
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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


def parse_config(argv=None) -> Config:
    """Config from the command line (config_parser)."""
    return Config(**vars(config_parser(Config, description=__doc__).parse_args(argv)))


def read_rows(paths: list[str]) -> list[dict]:
    """Rows of earlier results.csv files (same cases: same seed and spectra settings)."""
    rows = []
    for path in paths:
        with open(path, newline="") as fh:
            for r in csv.DictReader(fh):
                r["case"], r["n_init"] = int(r["case"]), int(r["n_init"])
                for key in ("loss", "nfev", "time_s"):
                    if r.get(key) not in (None, ""):
                        r[key] = float(r[key])
                rows.append({k: v for k, v in r.items() if v != ""})
    return rows


def fit_all(cfg: Config) -> list[dict]:
    """Make the spectra and fit each with every method; rows of raw results."""
    rng = np.random.default_rng(cfg.seed)
    groups = cfg.groups
    known = {"trained", "heldout", "real", "forest_trained", "forest_heldout"}
    if not set(groups) <= known:
        raise ValueError(f"--groups {' '.join(groups)}: expected some of {sorted(known)}")
    trained = [load(n, cfg) for n in cfg.trained]
    tasks = []
    if "real" in groups:
        tasks += [("real", i, case, cfg) for i, case in enumerate(real_cases(cfg))]
    synthetic = {g: [] for g in ("trained", "heldout") if g in groups}
    for group in synthetic:
        pool = trained if group == "trained" else [load(n, cfg) for n in cfg.heldout]
        for i in range(cfg.n_spectra):
            mol = pool[i % len(pool)]
            others = [m for m in trained if m.name != mol.name]
            synthetic[group].append((group, i, synthetic_case(mol, others, rng, cfg), cfg))
    tasks += [t for pair in zip(*synthetic.values()) for t in pair]  # groups interleaved
    for group in [g for g in groups if g.startswith("forest")]:
        tasks += [(group, i, c, cfg) for i, c in enumerate(forest_cases(group, cfg, rng))]
    t0, rows = time.perf_counter(), []
    pool = Pool(cfg.workers) if cfg.workers > 1 else None
    fields = ["group", "case", "molecule", "method", "n_init", "loss", "nfev", "time_s", "used",
              "fallback", "error", *(f"err_{p}" for p in spectuner.PARAM_NAMES)]  # fmt: skip
    with open(Path(cfg.out) / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        try:
            results = pool.imap(run_case, tasks) if pool else map(run_case, tasks)
            for k, case_rows in enumerate(results):
                rows += case_rows
                writer.writerows(case_rows)  # flushed per case: a stopped run keeps its rows
                fh.flush()
                print(f"done={k + 1}/{len(tasks)} elapsed_s={time.perf_counter() - t0:.0f}",
                      flush=True)  # fmt: skip
        finally:
            if pool:
                pool.close()
    return rows


def main(cfg: Config) -> list[dict]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    # --- fits (written to results.csv as they finish), or earlier results ---
    rows = relative(read_rows(cfg.inputs) if cfg.inputs else fit_all(cfg))
    # --- save ---
    summary = summarise(rows)
    with open(out / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    for s in summary:
        print(
            " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items())
        )
    plot(summary, out / "figure.png")
    return summary


if __name__ == "__main__":
    try:
        main(parse_config())
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
