"""The maps of a cube fit: parameters, errors, limits, model cube, quick look and summary.

From the pixel records (cube_store.py): one FITS map per parameter and molecule with the cube's
celestial WCS, errors, peak opacity, loss, nfev, rms and status maps, N_tot upper limits where a
molecule is not detected (issue 15, spectuner.detect_and_limit), the model cube on the input
grid, failures.csv, summary.json and a quick-look PNG (docs/method.md §9).

    import cube_maps
    summary = cube_maps.write_outputs(out, shared, cube, cfg, info, complete=True)
"""

import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import astropy
import numpy as np
import scipy
from astropy.io import fits

import spectuner
from cube_run import PARAMS, finite_runs, pixel_windows
from cube_store import file_sha256, load_chunks

PARAM_UNITS = {"eta": "", "T_ex": "K", "N_tot": "cm-2", "delta_v": "km/s", "v_off": "km/s"}
STATUS = {0: "fitted", 1: "outside", 2: "blank", 3: "bad_input", 4: "few_peaks", 5: "failed",
          6: "unconverged", 8: "limit", -1: "pending"}  # fmt: skip


# --- outputs ---


def assemble(rec: dict, selected: np.ndarray, n_par: int) -> dict:
    """Maps (Y, X) from records: status (-1 pending where selected, 1 outside), values, ..."""
    shape = selected.shape
    maps = dict(status=np.where(selected, -1, 1).astype(np.int16))
    for k in ("loss", "nfev", "rms", "n_peaks"):
        maps[k] = np.full(shape, np.nan)
    maps["values"], maps["errors"] = np.full((2, n_par, *shape), np.nan)
    for k in ("tau_max", "at_bound", "dchi2"):
        maps[k] = np.full((n_par // 5, *shape), np.nan)
    if rec["y"].size:
        y, x, fitted = rec["y"].astype(int), rec["x"].astype(int), np.isin(rec["code"], (0, 6))
        maps["status"][y, x] = rec["code"]
        maps["loss"][y, x] = np.where(fitted, rec["loss"], np.nan)
        maps["nfev"][y, x] = np.where(fitted, rec["nfev"], np.nan)
        maps["rms"][y, x], maps["n_peaks"][y, x] = rec["rms"], rec["n_peaks"]
        maps["values"][:, y, x], maps["errors"][:, y, x] = rec["values"].T, rec["errors"].T
        for k in ("tau_max", "at_bound", "dchi2"):
            maps[k][:, y, x] = rec[k].T
    return maps


def limit_reference(S: dict, maps: dict, detected: np.ndarray) -> tuple[list, str]:
    """Per molecule, the (5,) parameters at which its N_tot limits are computed (issue 15).

    A fixed parameter (--fix) keeps its value; a free one takes the median over the pixels
    where the molecule is detected; N_tot is scanned. None (and why) where a free parameter
    has no detected pixel to take it from.
    """
    names = [m.name for m in S["mols"]]
    box = spectuner.make_box(names, S["fit_kwargs"]["bounds"], S["fit_kwargs"]["fix"])
    refs, why = [], []
    for k, m in enumerate(names):
        x = box["x_fix"][5 * k : 5 * k + 5].copy()
        free = [p for j, p in enumerate(PARAMS) if np.isnan(x[j]) and p != "N_tot"]
        if free and not detected[k].any():
            refs.append(None)
            why.append(f"{m}: no detected pixel to take {free} from (fix them with --fix)")
            continue
        for j, p in enumerate(PARAMS):
            if p in free:
                x[j] = np.median(maps["values"][5 * k + j][detected[k]])
        refs.append(x)
    return refs, "; ".join(why)


def upper_limit_maps(S: dict, maps: dict) -> tuple[np.ndarray, dict]:
    """N_tot upper limits (n_mol, Y, X) where a molecule is not detected, and how they were made.

    A molecule is detected in a fitted pixel when its Delta chi2 over "no molecule" along the
    N_tot profile is at least spectuner.DETECT_DCHI2; it is not in one it was not fitted in (too
    few peaks) or where that test fails. There the limit is spectuner.detect_and_limit's, at
    limit_reference's parameters; the other molecules are held at their fits where detected,
    else absent (N_tot = 0). The pixel's parameter maps of that molecule become NaN.
    """
    names, kw = [m.name for m in S["mols"]], S["fit_kwargs"]
    fitted = np.isin(maps["status"], (0, 6))
    detected = fitted & ~(maps["dchi2"] < spectuner.DETECT_DCHI2)  # older chunks: NaN, kept
    refs, why = limit_reference(S, maps, detected)
    box = spectuner.make_box(names, kw["bounds"], kw["fix"])
    upper, values = np.full(maps["dchi2"].shape, np.nan), maps["values"].copy()
    absent = [np.r_[r[:2], 0.0, r[3:]] if r is not None else np.array([0.5, 100.0, 0, 1, 0])
              for r in refs]  # fmt: skip
    for k, ref in enumerate(refs):
        todo = ((maps["status"] == 4) | fitted) & ~detected[k]
        maps["values"][5 * k : 5 * k + 5, todo] = maps["errors"][5 * k : 5 * k + 5, todo] = np.nan
        for y, x in np.argwhere(todo) if ref is not None else []:
            X = np.concatenate(
                [
                    values[5 * j : 5 * j + 5, y, x] if detected[j, y, x] else a
                    for j, a in enumerate(absent)
                ]
            )  # others: the fit, or absent
            X[5 * k : 5 * k + 5] = ref
            windows = pixel_windows(S, y, x, maps["rms"][y, x])
            try:  # one problem per pixel, evaluated along the whole N_tot scan
                resid_x = spectuner.residuals_at(windows, S["mols"], X, kw["v_lsr_kms"],
                                                 kw["dish_m"])  # fmt: skip
                upper[k, y, x] = spectuner.detect_and_limit(resid_x, X, k, box)["N_tot_upper"]
            except ValueError:  # no line of the molecule within reach of this pixel's windows
                continue
    limit = (np.isfinite(upper).any(0) & ~detected.any(0)) & np.isin(maps["status"], (0, 4, 6))
    maps["status"][limit] = 8
    info = dict(n_sigma=spectuner.LIMIT_SIGMA, detect_dchi2=spectuner.DETECT_DCHI2,
                reference={m: None if r is None else {p: float(v) for p, v in zip(PARAMS, r)
                                                      if p != "N_tot"}
                           for m, r in zip(names, refs)}, why_none=why)  # fmt: skip
    return upper, info


def write_map(path: Path, image: np.ndarray, cube: dict, bunit: str, name: str) -> None:
    """A 2-D FITS image with the cube's celestial WCS, BUNIT and BTYPE."""
    header = cube["wcs2d"].copy()
    header["BUNIT"], header["BTYPE"], header["ORIGIN"] = bunit, name, "fit_cube.py"
    fits.PrimaryHDU(image, header).writeto(path, overwrite=True)


def write_model_cube(path: Path, S: dict, maps: dict, cube: dict, names: list) -> None:
    """The fitted model on the input grid, in the input unit (NaN where not fitted)."""
    model = np.full(cube["data"].shape, np.nan, dtype=np.float32)
    for y, x in np.argwhere(np.isin(maps["status"], (0, 6))):
        vals = maps["values"][:, y, x]
        params = {m: dict(zip(PARAMS, vals[5 * k : 5 * k + 5])) for k, m in enumerate(names)}
        windows = pixel_windows(S, y, x, maps["rms"][y, x])
        kw = S["fit_kwargs"]
        models = spectuner.model_windows(windows, S["mols"], params, kw["v_lsr_kms"], kw["dish_m"])
        runs = finite_runs(np.isfinite(S["data"][:, y, x]), S["min_channels"])
        for (a, b), T_K in zip(runs, models):
            model[a:b, y, x] = T_K / S["K_per_unit"][a:b]
    n_rest = len(cube["shape"]) - 3
    model = model.reshape(model.shape + (1,) * n_rest).transpose(np.argsort(cube["order"]))
    header = cube["header"].copy()
    header["ORIGIN"] = "fit_cube.py"
    fits.PrimaryHDU(model, header).writeto(path, overwrite=True)


def to_file_order(path: Path, cube: dict) -> None:
    """Flip a cube written in read_cube's ascending channels back to the file's (descending)
    order, so that it matches the input header it carries."""
    with fits.open(path, memmap=False) as hdul:
        data, header = hdul[0].data, hdul[0].header
    fits.PrimaryHDU(np.flip(data, axis=cube["order"][0]), header).writeto(path, overwrite=True)


def quicklook(path: Path, maps: dict, names: list, unit: str = "") -> bool:
    """PNG of every parameter map, loss and status (False when matplotlib is not installed)."""
    try:
        fig = quicklook_figure(maps, names, unit)
    except ImportError:
        return False
    fig.savefig(path, dpi=80)
    return True


def quicklook_figure(maps: dict, names: list, unit: str = ""):
    """The quick-look figure: a row per molecule (log10 of eta and N_tot), then loss, nfev, rms
    (in the cube's unit) and status with a colour bar of the status names."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure

    rows = len(names) + 1
    fig = Figure(figsize=(15, 2.9 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, 5, squeeze=False)
    for k, m in enumerate(names):
        for j, p in enumerate(PARAMS):
            image = maps["values"][5 * k + j]
            log = p in ("N_tot", "eta")
            with np.errstate(divide="ignore", invalid="ignore"):
                image = np.log10(image) if log else image
            unit_p = f" [{PARAM_UNITS[p]}]" if PARAM_UNITS[p] else " (no unit)"
            fig.colorbar(axes[k, j].imshow(image, origin="lower"), ax=axes[k, j])
            axes[k, j].set_title(f"{m} {'log10 ' if log else ''}{p}{unit_p}", fontsize=9)
    extra = (("loss", "loss"), ("nfev", "forward-model runs"), ("rms", f"rms [{unit}]"))
    for j, (key, title) in enumerate(extra):
        fig.colorbar(axes[-1, j].imshow(maps[key], origin="lower"), ax=axes[-1, j])
        axes[-1, j].set_title(title, fontsize=9)
    codes = sorted(STATUS)  # shown by position: the codes need not be consecutive
    colours = ["0.6", "C2", "0.85", "0.35", "C1", "C4", "C3", "C0", "C9"]  # -1 pending ... 8
    norm = BoundaryNorm(np.arange(-0.5, len(codes)), len(codes))
    status = np.asarray(maps["status"], dtype=float)
    where = np.searchsorted(codes, np.nan_to_num(status, nan=codes[0])).astype(float)
    where[~np.isfinite(status)] = np.nan
    im = axes[-1, 3].imshow(where, origin="lower", cmap=ListedColormap(colours[: len(codes)]),
                            norm=norm, interpolation="nearest")  # fmt: skip
    bar = fig.colorbar(im, ax=axes[-1, 3], ticks=np.arange(len(codes)))
    bar.ax.set_yticklabels([f"{STATUS[c]}" for c in codes], fontsize=7)
    axes[-1, 3].set_title("status", fontsize=9)
    axes[-1, 4].set_axis_off()
    for ax in axes.ravel():
        if ax.get_title():
            ax.set_xlabel("x [pixel]", fontsize=8)
            ax.set_ylabel("y [pixel]", fontsize=8)
    fig.suptitle("eta and N_tot are degenerate where the lines are thin (only eta x N_tot is "
                 "constrained; see M_tau_max.fits): read them together", fontsize=9)  # fmt: skip
    return fig


def counts_line(status: np.ndarray, reasons: dict, at_bound: int = 0) -> tuple[dict, str]:
    """Counts by status and reason, and the final line (fitted, of them at a bound, limits,
    skipped, failed by reason)."""
    n = {STATUS[c]: int((status == c).sum()) for c in STATUS}
    skipped = {k: n[k] for k in ("outside", "blank", "bad_input", "few_peaks") if n[k]}
    text = f"fitted={n['fitted']}" + (f" (at_bound={at_bound})" if at_bound else "")
    text += f" limits={n['limit']}" if n["limit"] else ""
    text += f" skipped={sum(skipped.values())}"
    text += f" ({', '.join(f'{k}={v}' for k, v in skipped.items())})" if skipped else ""
    for key in ("failed", "unconverged"):
        if n[key]:
            why = ", ".join(f"{k}={v}" for k, v in sorted(reasons[key].items()))
            text += f" {key}={n[key]} ({why})"
    text += f" pending={n['pending']}" if n["pending"] else ""
    return n | {"reasons": reasons, "at_bound": at_bound}, text


def write_outputs(out: Path, S: dict, cube: dict, cfg, info: dict, complete: bool) -> dict:
    """Maps, model cube (complete runs), failures.csv, summary.json and the quick-look PNG."""
    names = [m.name for m in S["mols"]]
    rec = load_chunks(out / "chunks")
    maps = assemble(rec, S["selected"], 5 * len(names))
    model_maps = dict(maps, values=maps["values"].copy())  # before non-detections become NaN
    upper, limits = upper_limit_maps(S, maps)
    for k, m in enumerate(names):
        for j, p in enumerate(PARAMS):
            write_map(out / f"{m}_{p}.fits", maps["values"][5 * k + j], cube, PARAM_UNITS[p], p)
            write_map(out / f"{m}_{p}_err.fits", maps["errors"][5 * k + j], cube, PARAM_UNITS[p],
                      f"{p} 1-sigma error")  # fmt: skip
        write_map(out / f"{m}_tau_max.fits", maps["tau_max"][k], cube, "", "peak line opacity")
        write_map(out / f"{m}_N_tot_upper.fits", upper[k], cube, "cm-2",
                  f"N_tot {limits['n_sigma']:g}-sigma upper limit")  # fmt: skip
        write_map(out / f"{m}_at_bound.fits", maps["at_bound"][k], cube, "", "at a bound (bits)")
        write_map(out / f"{m}_dchi2.fits", maps["dchi2"][k], cube, "", "chi2(no molecule) - chi2")
    for key, unit in (("loss", ""), ("nfev", ""), ("status", ""), ("rms", cube["unit"])):
        write_map(out / f"{key}.fits", maps[key], cube, unit, key)
    if complete:
        write_model_cube(out / "model_cube.fits", S, model_maps | dict(status=maps["status"]),
                         cube, names)  # fmt: skip
        if cube.get("descending"):
            to_file_order(out / "model_cube.fits", cube)
    elif (out / "model_cube.fits").exists():
        (out / "model_cube.fits").unlink()  # of an earlier run: it would not match these maps
    reasons = {"failed": {}, "unconverged": {}}
    lines = ["y,x,status,reason"]
    for y, x, code, why in zip(rec["y"], rec["x"], rec["code"], rec["reason"]):
        if code in (5, 6):
            key = str(why).split(":")[0] if code == 5 else str(why)
            reasons[STATUS[code]][key] = reasons[STATUS[code]].get(key, 0) + 1
            lines.append(f"{y},{x},{code},{json.dumps(str(why))}")
    (out / "failures.csv").write_text("\n".join(lines) + "\n")
    n_at_bound = int((np.isin(maps["status"], (0, 6)) & (maps["at_bound"] > 0).any(0)).sum())
    counts, line = counts_line(maps["status"], reasons, n_at_bound)
    fitted = np.isin(rec["code"], (0, 6))
    median = lambda a: float(np.median(a[fitted])) if fitted.any() else None  # noqa: E731
    info["timing"] |= dict(
        fit_s_total=float(rec["time_s"].sum()),
        cpu_s_total=float(rec["cpu_s"].sum()),
        cpu_s_per_pixel=float(rec["cpu_s"].mean()) if rec["y"].size else None,
        median_nfev=median(rec["nfev"]),
        median_fit_s=median(rec["time_s"]),
    )
    summary = info | dict(complete=complete, counts=counts, summary_line=line, limits=limits,
                          status_codes={str(c): s for c, s in STATUS.items()})  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    summary["quicklook"] = quicklook(out / "quicklook.png", maps, names, cube["unit"])
    return summary


def run_info(cfg, cube: dict, mols: list, cube_sha256: str, v_from: str, progress: dict) -> dict:
    """The provenance of summary.json: config (a fit_cube.Config), argv, versions, the input
    cube, the catalogue entries, and the timing of this run (progress as of run_pixels)."""
    wall, n_done, workers = time.time() - progress["t_fit"], progress["done"], cfg.workers
    versions = dict(python=platform.python_version(), numpy=np.__version__,
                    scipy=scipy.__version__, astropy=astropy.__version__)  # fmt: skip
    versions |= {k: sys.modules[k].__version__ for k in ("torch", "dask") if k in sys.modules}
    catalogue = [dict(name=m.name, source=m.source, n_lines=int(m.freq_MHz.size),
                      sha256=file_sha256(m.source) if Path(m.source).is_file() else None)
                 for m in mols]  # fmt: skip
    beams = cube["beam_arcsec"]
    beam = None if beams is None else np.median(beams, axis=0).tolist()
    return dict(config=dataclasses.asdict(cfg), argv=sys.argv, versions=versions,
                input=dict(cube=str(cfg.cube), sha256=cube_sha256,
                           shape=list(cube["shape"]), unit=cube["unit"],
                           specsys=cube["specsys"], restfrq_Hz=cube["restfrq_Hz"],
                           freq_MHz=[float(cube["freq_MHz"][0]), float(cube["freq_MHz"][-1])],
                           beam_arcsec=beam, v_lsr_kms=cfg.v_lsr, v_lsr_from=v_from,
                           descending=cube["descending"]),
                catalogue=catalogue,
                timing=dict(wall_s=wall, total_s=time.time() - progress["t_start"],
                            workers=workers, pixels_this_run=n_done,
                            pixels_per_s=n_done / max(wall, 1e-9),
                            core_s_per_pixel=wall * workers / max(n_done, 1)))  # fmt: skip
