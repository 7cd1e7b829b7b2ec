"""Fit an LTE model to every pixel of a spectral cube (docs/method.md §9; arXiv:2511.21027).

Reads a FITS cube (FREQ axis, or a velocity axis with RESTFRQ; K or Jy/beam, per-channel CASA
beams honoured), estimates the noise of each pixel from its line-free channels, fits the pixels
with enough peaks with `spectuner.fit_spectrum` in worker processes (or on Dask distributed), and
writes one FITS map per parameter with the cube's celestial WCS, plus error, peak-opacity, loss,
nfev and status maps, the model cube and a summary. Results are flushed in chunks; `--resume`
continues a partial run. The work is done by cube_io.py (reading), cube_run.py (the pixels and
workers), cube_store.py (chunks, resume) and cube_maps.py (the outputs); this script holds the
Config, the checks made before the first pixel, main and the command line.

    python fit_cube.py data/demo_cube.fits --mol CH3OH
    python fit_cube.py cube.fits --mol CH3OH CH3OCHO --v_lsr 2.7 --region 10:40,20:60 --resume
    python fit_cube.py cube.fits --mol CH3OH --scheduler tcp://10.0.0.1:8786 --out fit/
    python fit_cube.py make_demo data/demo_cube.fits     # rebuild the demo cube (seeded)

Status codes (status.fits): 0 fitted; 1 outside --region/--mask; 2 blank (no finite channel);
3 bad input (noise not positive, or continuum NaN); 4 too few peaks (< min_peaks peaks of height
and prominence >= peak_snr x rms); 5 failed (the fit raised; reason in failures.csv); 6 fitted but
the optimiser did not report success (e.g. maxiter; values kept, reason in failures.csv);
8 limit (no molecule detected: an upper limit on N_tot in MOL_N_tot_upper.fits, see the README);
-1 pending (not processed yet: an interrupted run, continue it with --resume).
A fit with a free parameter at a face of the box is flagged in MOL_at_bound.fits (bit j: the
j-th of eta, T_ex, N_tot, delta_v, v_off at its lower bound; bit 5 + j: at its upper bound).
"""

import argparse
import dataclasses
import inspect
import os
import re
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import lte
import problem
import spectuner
from cube_io import (  # noqa: F401  (re-exported: fit_cube.read_cube, fit_cube.make_demo, ...)
    C_MS,
    make_demo,
    parse_region,
    read_continuum,
    read_cube,
    read_noise,
    read_plane,
    systemic_velocity,
)
from cube_maps import assemble, quicklook_figure, run_info, write_outputs  # noqa: F401
from cube_passes import run_passes
from cube_run import pixel_rms, resolve_workers  # noqa: F401  (re-exported: fit_cube.pixel_rms)
from cube_store import (  # noqa: F401  (re-exported: fit_cube.REC_KEYS, fit_cube.load_chunks)
    REC_KEYS,
    check_out,
    flush_chunk,
    load_chunks,
    pixels_to_do,
    start_or_resume,
)


@dataclass
class Config:
    cube: str = ""  # input FITS cube (positional)
    mol: list[str] = field(default_factory=list)  # required: molecules (names or .cat paths),
    # fitted jointly
    catalog: str = ""  # catalogue file or folder for every --mol; "" = lte's bundled default
    method: str = "auto"  # auto (nn+stack+slsqp if a policy exists, else random+slsqp), nn,
    # nn+slsqp, nn+nelder-mead, nn+stack+slsqp, random+slsqp, random+nelder-mead, pso, pso+slsqp,
    # pso+nelder-mead, stack, stack+slsqp, stack+nelder-mead (spectuner.METHODS)
    policy: str = ""  # policy file for the nn methods; "" = data/policy.pt
    loss: str = "pm"  # pm (peak matching) or chi2
    n_init: int = 50  # random starts (policy samples for nn methods) per pixel
    n_refine: int = 2  # best distinct starts refined per pixel, best kept (>= 1)
    neighbours: bool = True  # two passes: a quarter of the pixels, then the rest from their
    # fitted neighbours with one refinement (cube_passes.py; docs/benchmarks.md §4)
    maxiter: int = 0  # SLSQP iterations per refinement; 0 = 10 with pm (the chi2 refinement
    # then sets the values: same maps, half the CPU; docs/benchmarks.md §4), 100 with chi2
    bounds: list[str] = field(default_factory=list)  # [MOL:]NAME=LO:HI, physical units
    fix: list[str] = field(default_factory=list)  # [MOL:]NAME=VALUE, physical units
    v_lsr: float = float("nan")  # systemic velocity, km/s; nan = header (VELO-LSR...) or 0
    dish_m: float = 0.0  # single-dish diameter, m (eta at the data centre); 0 = interferometer
    continuum: str = ""  # FITS continuum image (K or Jy/beam): T_bg per pixel; "" = 0 K
    rms: str = ""  # noise in the cube's BUNIT: a number or a FITS map; "" = estimated per pixel
    bunit: str = ""  # override the header BUNIT: K or Jy/beam; "" = from the header
    region: str = ""  # pixel box X0:X1,Y0:Y1 (0-based, end excluded, as numpy); "" = all
    mask: str = ""  # FITS image: fit only where it is finite and non-zero; "" = all
    min_peaks: int = 1  # fit a pixel only if it has at least this many peaks ...
    peak_snr: float = 5.0  # ... of height and prominence >= peak_snr x rms
    min_channels: int = 8  # shortest run of finite channels used as a window
    seed: int = 0  # per-pixel seeds derive from (seed, y, x)
    workers: int = 0  # worker processes; 0 = all cores; 1 = in this process, no pool
    scheduler: str = ""  # Dask scheduler address, or "local" (a LocalCluster); "" = process pool
    out: str = ""  # output folder; "" = <cube stem>_fit/ in the current folder
    resume: bool = False  # continue the partial run in --out (same cube and fit options)
    overwrite: bool = False  # delete the results of an earlier run in --out and start afresh
    flush_every: int = 64  # pixels per chunk written to OUT/chunks/
    log_every_s: float = 5.0  # seconds between progress lines (stderr and OUT/metrics.csv)
    quiet: bool = False  # no progress or log lines on stderr


# --- checks made before the first pixel, and the data ---


def check_options(cfg: Config, log) -> tuple[Config, Path]:
    """cfg with the method (auto resolved) and worker count it runs with and its --out folder,
    after the checks that need no file (notes through log).

    Raises:
        ValueError: no --mol, an unknown method or loss, --n_init < 1 or --maxiter < 0, a negative
            --workers, or an --out that is a file or holds an earlier run (without --resume or
            --overwrite).
    """
    if not cfg.mol:
        raise ValueError("no molecule: give --mol NAME (e.g. --mol CH3OH)")
    method, note = spectuner.resolve_method(cfg.method, cfg.policy or None)
    if note:
        log(f"note: {note}")
    if method not in spectuner.METHODS or cfg.loss not in spectuner.LOSSES:
        raise ValueError(f"--method {method!r} / --loss {cfg.loss!r}: expected one of "
                         f"{sorted(spectuner.METHODS)} / {sorted(spectuner.LOSSES)}")  # fmt: skip
    if cfg.n_init < 1 or cfg.maxiter < 0:
        raise ValueError(f"--n_init {cfg.n_init} / --maxiter {cfg.maxiter}: expected >= 1 / >= 0")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers, note = resolve_workers(cfg.workers, cores)
    if note:
        log(f"note: {note}")
    stem = re.sub(r"\.fits?(\.gz)?$", "", Path(cfg.cube).name, flags=re.I)
    out = Path(cfg.out or f"{stem}_fit")
    check_out(out, cfg.resume, cfg.overwrite)
    maxiter = cfg.maxiter or (10 if cfg.loss == "pm" else 100)
    cfg = dataclasses.replace(cfg, method=method, workers=workers, out=str(out), maxiter=maxiter)
    return cfg, out


def select_pixels(cfg: Config, cube: dict) -> np.ndarray:
    """(Y, X) bool: the pixels inside --region and --mask.

    Raises:
        ValueError: a cube without a finite value, or a selection without a pixel (and the
            errors of cube_io.parse_region and read_plane).
    """
    selected = np.ones(cube["data"].shape[1:], bool)
    if cfg.region:
        box = np.zeros_like(selected)
        box[parse_region(cfg.region, selected.shape)] = True
        selected &= box
    if cfg.mask:
        mask = read_plane(cfg.mask, selected.shape, "mask")[0]
        selected &= np.isfinite(mask) & (mask != 0)
    if not np.isfinite(cube["data"]).any():
        raise ValueError(f"cube {cfg.cube} has no finite value (all NaN or inf): nothing to fit")
    if not selected.any():
        raise ValueError(f"--region {cfg.region!r} / --mask {cfg.mask!r} select no pixel")
    return selected


def load_molecules(cfg: Config, cube: dict) -> tuple[list, dict, dict]:
    """(molecules cut to the lines that can reach the band, bounds, fix) of the options.

    Raises:
        ValueError: a molecule without a line in reach (and those of lte.load_molecule and
            spectuner.make_box).
    """
    rest = cube["freq_MHz"] * (1 + cfg.v_lsr / lte.C_KMS)
    mols = [lte.load_molecule(m, cfg.catalog or None) for m in cfg.mol]
    bounds = spectuner.parse_assignments(cfg.bounds, ranged=True)
    fix = spectuner.parse_assignments(cfg.fix, ranged=False)
    box = spectuner.make_box([m.name for m in mols], bounds, fix)  # bad names raise here
    span = problem.reach_kms(box) / lte.C_KMS  # keep the lines that can reach the band
    lo, hi = rest.min() * (1 - span), rest.max() * (1 + span)
    mols = [lte.select_lines(m, lo, hi) for m in mols]
    for m in mols:
        if m.freq_MHz.size == 0:
            raise ValueError(f"molecule {m.name} has no line in the cube's band: rest frame "
                             f"{lo:.1f}-{hi:.1f} MHz (v_lsr {cfg.v_lsr:g} km/s, "
                             f"+-{span * lte.C_KMS:.0f} km/s)")  # fmt: skip
    return mols, bounds, fix


# --- main ---


def main(cfg: Config) -> dict:
    """Fit every selected pixel of cfg.cube and write the maps (see the module docstring)."""
    t_start = time.time()
    log = (lambda s: None) if cfg.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    # --- data ---
    cfg, out = check_options(cfg, log)
    cube = read_cube(cfg.cube, cfg.bunit)
    v_lsr, v_from = systemic_velocity(cfg.v_lsr, cube)
    cfg = dataclasses.replace(cfg, v_lsr=v_lsr)
    log(f"cube={cfg.cube} shape={cube['data'].shape} unit={cube['unit']} "
        f"specsys={cube['specsys'] or 'unset'} freq_MHz={cube['freq_MHz'].min():.3f}:"
        f"{cube['freq_MHz'].max():.3f} v_lsr={v_lsr:g} km/s (from {v_from})")  # fmt: skip
    selected = select_pixels(cfg, cube)
    rms = read_noise(cfg.rms, selected, cube["unit"])
    T_bg = read_continuum(cfg.continuum, cube) if cfg.continuum else np.zeros(selected.shape)
    # --- model: molecules, fit options ---
    mols, bounds, fix = load_molecules(cfg, cube)
    fit_kwargs = dict(method=cfg.method, loss=cfg.loss, n_init=cfg.n_init, n_refine=cfg.n_refine,
                      maxiter=cfg.maxiter, limits=False,  # dchi2 only: the limit maps are below
                      bounds=bounds, fix=fix, v_lsr_kms=v_lsr, dish_m=cfg.dish_m or None,
                      policy=cfg.policy or None)  # fmt: skip
    beams = cube["beam_arcsec"]
    S = dict(token=uuid.uuid4().hex, data=cube["data"], freq_MHz=cube["freq_MHz"],
             K_per_unit=cube["K_per_unit"], T_bg=T_bg, rms=rms, mols=mols, fit_kwargs=fit_kwargs,
             beam_arcsec=float(np.median(np.sqrt(beams.prod(1)))) if beams is not None else None,
             seed=cfg.seed, peak_snr=cfg.peak_snr, min_peaks=cfg.min_peaks,
             min_channels=cfg.min_channels, selected=selected)  # fmt: skip
    # --- resume or start afresh ---
    run_key = start_or_resume(out, cfg)
    is_done, todo = pixels_to_do(selected, load_chunks(out / "chunks"))
    kind = "dask" if cfg.scheduler else ("pool" if cfg.workers > 1 else "inprocess")
    log(f"pixels={int(selected.sum())} done_before={int(is_done.sum())} todo={len(todo)} "
        f"runner={kind} workers={cfg.workers} mol={cfg.mol} method={cfg.method}")  # fmt: skip
    # --- loop ---
    progress = dict(done=0, failed=0, first_failure="", t_start=t_start, t_fit=time.time())
    complete = False
    try:
        run_passes(S, todo, cfg, kind, out, log, progress)  # cube_passes.py
        complete = True
    finally:
        # --- save ---
        info = run_info(cfg, cube, mols, run_key["cube_sha256"], v_from, progress)
        summary = write_outputs(out, S, cube, cfg, info, complete)
        wall = info["timing"]["wall_s"]
        print(summary["summary_line"] + f" wall={wall:.1f}s out={out}", flush=True)
    summary["first_failure"] = progress["first_failure"]
    return summary


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
    """Config from the command line (config_parser): the cube, then options."""
    extend = dict(action="extend")  # --mol A --mol B gives both, as does --mol A B
    parser = config_parser(
        Config, positional=("cube",), prog="fit_cube.py",
        options=dict(cube=dict(nargs=None, metavar="CUBE"), mol=extend, bounds=extend, fix=extend),
        description=__doc__.split("\n\n")[0] + "\n\nRequired: the CUBE and --mol.",
        usage="%(prog)s CUBE --mol M [M ...] [options]\n"
              "       %(prog)s make_demo OUT [N_PIX N_CHAN]",
        epilog=__doc__.split("\n\n", 2)[2].replace("%", "%%"))  # fmt: skip
    return Config(**vars(parser.parse_args(argv)))


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler stopping the job), raised where Ctrl-C would be: the same
    flush of the finished pixels runs."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the flush must not be interrupted
    raise Terminated


def cli(argv: list[str] | None = None) -> int:
    """`python fit_cube.py CUBE --mol M ...`, or `... make_demo OUT [N_PIX N_CHAN]`.

    Exit codes: 0 done; 1 nothing was fitted (the line says why); 2 bad input (`error: ...`);
    130 Ctrl-C and 143 SIGTERM (the finished pixels are saved; continue with --resume).
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["make_demo"]:
        demo = argparse.ArgumentParser(prog="fit_cube.py make_demo",
                                       description=make_demo.__doc__.split("\n\n")[0])  # fmt: skip
        demo.add_argument("out", help="FITS file to write (replaced if it exists)")
        demo.add_argument("n_pix", nargs="?", type=int, default=8, help="pixels per side (8)")
        demo.add_argument("n_chan", nargs="?", type=int, default=440, help="channels (440)")
        args = demo.parse_args(argv[1:])
        try:
            truth = make_demo(args.out, args.n_pix, args.n_chan)
        except (ValueError, OSError) as err:
            print(f"error: make_demo {args.out}: {err}", file=sys.stderr)
            return 2
        print(f"wrote={args.out} n_pix={truth['eta'].shape[0]}")
        return 0
    cfg = parse_config(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        summary = main(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        what = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        print(f"{what}: the finished pixels are saved; continue with --resume", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    n = summary["counts"]
    if n["fitted"] + n["unconverged"] == 0:
        why = f"; first failure: {summary['first_failure']}" if summary["first_failure"] else ""
        print(f"error: no pixel was fitted ({summary['summary_line']}){why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
