"""Fit an LTE model to every pixel of a spectral cube (docs/method.md §9; arXiv:2511.21027).

Reads a FITS cube (FREQ axis, or a velocity axis with RESTFRQ; K or Jy/beam, per-channel CASA
beams honoured), estimates the noise of each pixel from its line-free channels, fits the pixels
with enough peaks with `spectuner.fit_spectrum` in worker processes (or on Dask distributed), and
writes one FITS map per parameter with the cube's celestial WCS, plus error, peak-opacity, loss,
nfev and status maps, the model cube and a summary. Results are flushed in chunks; `--resume`
continues a partial run.

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
import hashlib
import inspect
import json
import os
import platform
import re
import signal
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import astropy
import numpy as np
import scipy
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from scipy.signal import find_peaks

import lte
import problem
import spectuner


@dataclass
class Config:
    cube: str = ""  # input FITS cube (positional)
    mol: list[str] = field(default_factory=list)  # molecules (names or .cat paths), fitted jointly
    catalog: str = ""  # catalogue file or folder for every --mol; "" = lte's bundled default
    method: str = "auto"  # auto (nn+stack+slsqp if a policy exists, else random+slsqp), nn,
    # nn+slsqp, nn+nelder-mead, nn+stack+slsqp, random+slsqp, random+nelder-mead, pso, pso+slsqp,
    # pso+nelder-mead, stack, stack+slsqp, stack+nelder-mead (spectuner.METHODS)
    policy: str = ""  # policy file for the nn methods; "" = data/policy.pt
    loss: str = "pm"  # pm (peak matching) or chi2
    n_init: int = 50  # random starts (policy samples for nn methods) per pixel
    n_refine: int = 2  # best distinct starts refined per pixel, best kept (>= 1)
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


PARAMS = spectuner.PARAM_NAMES  # eta, T_ex, N_tot, delta_v, v_off
PARAM_UNITS = {"eta": "", "T_ex": "K", "N_tot": "cm-2", "delta_v": "km/s", "v_off": "km/s"}
STATUS = {0: "fitted", 1: "outside", 2: "blank", 3: "bad_input", 4: "few_peaks", 5: "failed",
          6: "unconverged", 8: "limit", -1: "pending"}  # fmt: skip
C_MS = lte.C_KMS * 1e3  # speed of light [m/s]
K_PER_JY = 1.222e6  # T [K] = 1.222e6 S [Jy/beam] / (nu_GHz^2 theta_maj theta_min [arcsec^2])
# FITS spectral world value w (SI: Hz, m/s, m, or redshift) and rest frequency f0 [Hz] -> Hz
TO_HZ = {
    "FREQ": lambda w, f0: w,
    "VRAD": lambda v, f0: f0 * (1.0 - v / C_MS),
    "VOPT": lambda v, f0: f0 / (1.0 + v / C_MS),
    "ZOPT": lambda z, f0: f0 / (1.0 + z),
    "VELO": lambda v, f0: f0 * np.sqrt((C_MS - v) / (C_MS + v)),
    "WAVE": lambda lam, f0: C_MS / lam,
}
UNITS = {"k": ("K", 1.0), "kelvin": ("K", 1.0), "mk": ("K", 1e-3), "jy/beam": ("Jy/beam", 1.0),
         "mjy/beam": ("Jy/beam", 1e-3), "ujy/beam": ("Jy/beam", 1e-6),
         "jy": ("Jy/beam", 1.0)}  # fmt: skip
V_LSR_KEYS = ("VELO-LSR", "VLSR", "VSYS")  # header keywords for the systemic velocity, m/s
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
RESUME_KEYS = tuple(  # options a resumed run must share with the run it continues
    "mol catalog method policy loss n_init n_refine bounds fix v_lsr dish_m continuum rms bunit "
    "min_peaks peak_snr min_channels seed".split()
)


# --- reading the cube (docs/method.md §9) ---


def brightness_unit(bunit: str) -> tuple[str, float]:
    """("K" or "Jy/beam", scale to that unit) of a FITS BUNIT string.

    Raises:
        ValueError: an unknown unit (the message lists the accepted ones).
    """
    s = re.sub(r"[\s.*]|\(.*\)$", "", bunit.lower())
    s = s.replace("beam^-1", "/beam").replace("beam-1", "/beam").replace("/bm", "/beam")
    if s not in UNITS:
        raise ValueError(f"BUNIT {bunit!r} unknown; expected one of {sorted(UNITS)} (or --bunit)")
    return UNITS[s]


def read_beams(hdul: fits.HDUList, header: fits.Header, n_chan: int) -> np.ndarray | None:
    """Beam (BMAJ, BMIN) per channel [arcsec] (C, 2): the CASA BEAMS table, else BMAJ/BMIN.

    Raises:
        ValueError: a BEAMS table whose channel count differs from the cube's.
    """
    if "BEAMS" in hdul:
        table = hdul["BEAMS"].data
        cols = hdul["BEAMS"].columns
        rows = table[table["POL"] == 0] if "POL" in cols.names else table
        rows = rows[np.argsort(rows["CHAN"])] if "CHAN" in cols.names else rows
        if len(rows) != n_chan:
            raise ValueError(f"BEAMS table has {len(rows)} beams for {n_chan} channels")
        scale = [u.Unit(cols[k].unit or "arcsec").to(u.arcsec) for k in ("BMAJ", "BMIN")]
        return np.column_stack([rows["BMAJ"] * scale[0], rows["BMIN"] * scale[1]]).astype(float)
    if "BMAJ" in header and "BMIN" in header:
        return np.tile([header["BMAJ"] * 3600.0, header["BMIN"] * 3600.0], (n_chan, 1))
    return None


def _spectral_Hz(w: WCS, n_chan: int) -> np.ndarray:
    """Observed frequency [Hz] of each channel of the spectral axis of w."""
    ax = w.wcs.spec
    world = w.sub([ax + 1]).wcs_pix2world(np.arange(n_chan, dtype=float), 0)[0]
    kind = w.wcs.ctype[ax][:4]
    f0 = w.wcs.restfrq or (C_MS / w.wcs.restwav if w.wcs.restwav else 0.0)
    if kind not in TO_HZ:
        raise ValueError(f"spectral axis {w.wcs.ctype[ax]!r}; expected one of {sorted(TO_HZ)}")
    if kind not in ("FREQ", "WAVE") and f0 <= 0:
        raise ValueError(f"velocity axis {w.wcs.ctype[ax]!r} needs RESTFRQ (or RESTWAV)")
    freq = TO_HZ[kind](world, f0)
    step = np.diff(freq)
    if n_chan < 2 or not np.isfinite(freq).all() or not ((step > 0).all() or (step < 0).all()):
        raise ValueError(f"spectral axis gives {n_chan} channels, not strictly monotonic")
    return freq


def read_cube(path: str, bunit: str = "") -> dict:
    """Read a FITS cube into (C, Y, X) with its frequencies, unit factors and 2-D WCS.

    Any axis order; CRPIX, CDELT sign and CUNIT honoured by wcslib; degenerate axes (Stokes)
    dropped. Y is the spatial axis with the higher FITS index, X the lower. The channels come
    in ascending frequency whatever the file's order (descending is True when the file's
    frequencies fall: data, freq_MHz, K_per_unit and beam_arcsec are then flipped), so that a
    fit does not depend on it.

    Args:
        path: FITS file; the first HDU with >= 3 axes is the cube.
        bunit: overrides the header BUNIT ("K" or "Jy/beam").
    Returns:
        dict: data (C, Y, X) float32 in the file's unit; freq_MHz (C,) observed frame;
        K_per_unit (C,) to convert to K; unit; beam_arcsec (C, 2) or None; wcs2d (fits.Header);
        header; order (numpy axes of C, Y, X, then the rest); shape (file array); specsys;
        restfrq_Hz; v_lsr_kms from the header or None; descending.
    Raises:
        FileNotFoundError: no such file. ValueError: not a readable FITS file (truncated, or
        another format), no cube, a non-degenerate extra axis, a spectral axis that cannot be
        read, an unknown unit, or Jy/beam without a beam.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"cube {path} not found")
    with warnings.catch_warnings(record=True) as caught:  # one line for a damaged file
        try:
            cube = _read_hdu(path)
        except (OSError, TypeError, EOFError) as err:  # astropy's, for truncated or not FITS
            raise ValueError(f"cube {path} is not a readable FITS file ({err})") from None
    for w in caught:
        if "truncated" in str(w.message):
            raise ValueError(f"cube {path} is not a readable FITS file ({w.message})")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    data, freq_Hz, beams, header, w, spatial, order, shape = cube
    n_chan = data.shape[0]
    descending = bool(freq_Hz[0] > freq_Hz[-1])
    if descending:  # ascending channels: the fit must not depend on the file's order
        data, freq_Hz = np.ascontiguousarray(data[::-1]), freq_Hz[::-1].copy()
        beams = None if beams is None else beams[::-1].copy()
    unit, scale = brightness_unit(bunit or header.get("BUNIT", ""))
    factor = np.full(n_chan, scale)
    if unit == "Jy/beam":
        if beams is None:
            raise ValueError(f"{path}: BUNIT is Jy/beam but there is no BMAJ/BMIN or BEAMS table")
        factor = scale * K_PER_JY / ((freq_Hz / 1e9) ** 2 * beams[:, 0] * beams[:, 1])
    v_key = next((k for k in V_LSR_KEYS if k in header), None)
    return dict(data=data, freq_MHz=freq_Hz / 1e6, K_per_unit=factor, unit=unit, beam_arcsec=beams,
                wcs2d=w.sub([spatial[0] + 1, spatial[1] + 1]).to_header(), header=header,
                order=order, shape=shape, specsys=w.wcs.specsys, restfrq_Hz=w.wcs.restfrq,
                v_lsr_kms=header[v_key] / 1e3 if v_key else None,
                descending=descending)  # fmt: skip


def _read_hdu(path: str) -> tuple:
    """(data (C, Y, X) in the file's channel order, freq_Hz, beams, header, wcs, spatial axes,
    numpy axis order, file shape) of the cube in path; the errors of read_cube."""
    with fits.open(path) as hdul:
        hdu = next((h for h in hdul if h.is_image and h.header.get("NAXIS", 0) >= 3), None)
        if hdu is None:
            raise ValueError(f"{path}: no image HDU with >= 3 axes")
        header, arr = hdu.header.copy(), np.asarray(hdu.data, dtype=np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)  # wcslib notes fixed date keys
            try:
                w = WCS(header)
            except ValueError as err:  # wcslib's errors are ValueErrors without the file name
                raise ValueError(f"{path}: invalid WCS: {err}") from err
        n = w.naxis
        if w.wcs.spec < 0:
            raise ValueError(f"{path}: no spectral axis among CTYPE {list(w.wcs.ctype)}")
        spatial = [i for i in range(n) if i != w.wcs.spec and w.wcs.ctype[i][:6] != "STOKES"]
        spatial = [i for i in spatial if arr.shape[n - 1 - i] > 1] if len(spatial) > 2 else spatial
        if len(spatial) != 2:
            raise ValueError(f"{path}: expected 2 spatial axes, got CTYPE {list(w.wcs.ctype)}")
        fits_axes = [w.wcs.spec, spatial[1], spatial[0]]
        others = [i for i in range(n) if i not in fits_axes]
        if any(arr.shape[n - 1 - i] != 1 for i in others):
            raise ValueError(f"{path}: extra axis {[w.wcs.ctype[i] for i in others]} not of size 1")
        order = [n - 1 - i for i in fits_axes + others]
        n_chan = arr.shape[order[0]]
        data = arr.transpose(order).reshape(n_chan, arr.shape[order[1]], arr.shape[order[2]])
        freq_Hz = _spectral_Hz(w, n_chan)
        beams = read_beams(hdul, header, n_chan)
    return data, freq_Hz, beams, header, w, spatial, order, arr.shape


def read_plane(path: str, shape: tuple, what: str) -> tuple[np.ndarray, fits.Header]:
    """A 2-D image (degenerate axes dropped) of the cube's spatial shape, and its header.

    Raises:
        FileNotFoundError: no such file. ValueError: its shape differs from the cube's.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} image {path} not found")
    with fits.open(path) as hdul:
        hdu = next(h for h in hdul if h.is_image and h.data is not None)
        image = np.squeeze(np.asarray(hdu.data, dtype=float))
        if image.shape != tuple(shape):
            raise ValueError(f"{what} image {path} has shape {image.shape}; the cube has {shape}")
        return image, hdu.header


def read_continuum(path: str, cube: dict) -> np.ndarray:
    """T_bg [K] per pixel from a continuum image in K or Jy/beam (its own beam, else the cube's).

    Raises:
        ValueError: Jy/beam and no beam known (and the errors of read_plane).
    """
    image, head = read_plane(path, cube["data"].shape[1:], "continuum")
    unit, scale = brightness_unit(head.get("BUNIT", "K"))
    if unit == "K":
        return image * scale
    if "BMAJ" in head and "BMIN" in head:
        beam = (head["BMAJ"] * 3600.0, head["BMIN"] * 3600.0)
    elif cube["beam_arcsec"] is not None:
        beam = np.median(cube["beam_arcsec"], axis=0)
    else:
        raise ValueError(f"continuum {path} is in Jy/beam but no beam is known")
    nu_GHz = np.median(cube["freq_MHz"]) / 1e3  # converted at the cube's central frequency
    return image * scale * K_PER_JY / (nu_GHz**2 * beam[0] * beam[1])


def parse_region(region: str, shape: tuple) -> tuple[slice, slice]:
    """Pixel box "X0:X1,Y0:Y1" (0-based, end excluded) -> (y slice, x slice) inside the map.

    Raises:
        ValueError: not of that form, an empty box, or a box reaching beyond the map (it is
        not clipped: a typo would otherwise fit another box than the one meant).
    """
    m = re.fullmatch(r"\s*(\d+):(\d+)\s*,\s*(\d+):(\d+)\s*", region)
    x0, x1, y0, y1 = (int(g) for g in m.groups()) if m else (0, 0, 0, 0)
    ny, nx = shape
    if not m or x0 >= x1 or y0 >= y1:
        raise ValueError(f"--region {region!r}: expected X0:X1,Y0:Y1 with X0 < X1 and Y0 < Y1")
    if x1 > nx or y1 > ny:
        raise ValueError(f"--region {region!r} reaches beyond the {nx} x {ny} pixel map "
                         f"(X 0:{nx}, Y 0:{ny}); give a box inside it")  # fmt: skip
    return slice(y0, y1), slice(x0, x1)


# --- one pixel: noise, selection, fit (runs in the workers) ---

_SHARED = {}  # read-only data of the run, set once per worker by _init_worker


def _init_worker(shared: dict, in_pool: bool = True, parent_pid: int | None = None) -> None:
    """Pool initializer: keep the shared data; one thread; Ctrl-C and SIGTERM are the parent's
    job (it flushes, then shuts the pool down); exit when the parent is gone."""
    _SHARED.clear()
    _SHARED.update(shared)
    if in_pool:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
    if parent_pid is not None:
        _exit_with_parent(parent_pid)


def _exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Kill this worker when its parent dies, even by SIGKILL (out of memory), so that no orphan
    keeps its memory: Linux's PR_SET_PDEATHSIG, and everywhere a daemon thread that polls the
    parent pid (a dead parent's children are handed to another process)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the thread below does it

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def finite_runs(ok: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    """(start, stop) of the runs of True in ok with at least min_len elements."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
    return [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b - a >= min_len]


def pixel_windows(S: dict, y: int, x: int, rms: float) -> list:
    """The pixel's runs of finite channels as spectuner Windows, in K (noise per channel)."""
    spec = S["data"][:, y, x].astype(float)
    out = []
    for a, b in finite_runs(np.isfinite(spec), S["min_channels"]):
        k = S["K_per_unit"][a:b]
        rms_K = rms * k if np.ptp(k) > 0 else rms * float(k[0])
        out.append(spectuner.Window(S["freq_MHz"][a:b], spec[a:b] * k, rms_K, S["T_bg"][y, x],
                                    S["beam_arcsec"]))  # fmt: skip
    return out


def pixel_seed(S: dict, y: int, x: int) -> int:
    """The pixel's seed: a function of (cfg.seed, y, x) only, whatever the workers."""
    return int(np.random.SeedSequence([S["seed"], y, x]).generate_state(1)[0])


def pixel_rms(S: dict, y: int, x: int, spec: np.ndarray) -> float:
    """Noise of the pixel: the --rms value or map, else a robust estimate from its channels."""
    ok = np.isfinite(spec)
    return S["rms"][y, x] if S["rms"] is not None else spectuner.estimate_rms(spec[ok])


def fit_pixel(S: dict, y: int, x: int, starts=None) -> dict:
    """Noise, selection and fit of pixel (y, x); a fit that raises becomes status 5.

    starts: the network's starts for this pixel (nn methods), drawn in the parent in batches.
    """
    n_par = 5 * len(S["mols"])
    nan = np.full(n_par, np.nan)
    rec = dict(y=y, x=x, code=0, reason="", rms=np.nan, n_peaks=0, loss=np.nan, nfev=0,
               time_s=0.0, values=nan, errors=nan, tau_max=nan[: len(S["mols"])],
               at_bound=nan[: len(S["mols"])], dchi2=nan[: len(S["mols"])])  # fmt: skip
    spec = S["data"][:, y, x].astype(float)
    ok = np.isfinite(spec)
    if not ok.any():
        return rec | dict(code=2, reason="no finite channel")
    rec["rms"] = pixel_rms(S, y, x, spec)
    if not rec["rms"] > 0 or not np.isfinite(S["T_bg"][y, x]):
        return rec | dict(code=3, reason=f"rms={rec['rms']:.3g} T_bg={S['T_bg'][y, x]:.3g}")
    level = S["peak_snr"] * rec["rms"]
    runs = finite_runs(ok, S["min_channels"])
    rec["n_peaks"] = sum(find_peaks(spec[a:b], height=level, prominence=level)[0].size
                         for a, b in runs)  # fmt: skip
    if rec["n_peaks"] < S["min_peaks"]:
        return rec | dict(code=4, reason=f"{rec['n_peaks']} peaks")
    seed = pixel_seed(S, y, x)
    try:
        res = spectuner.fit_spectrum(pixel_windows(S, y, x, rec["rms"]), S["mols"], seed=seed,
                                     starts=starts, **S["fit_kwargs"])  # fmt: skip
    except Exception as err:  # recorded per pixel and counted; the run goes on
        names = [m.name for m in S["mols"]]
        reason = f"{type(err).__name__}: {err} [pixel (y, x)=({y}, {x}) mol={names} seed={seed}]"
        return rec | dict(code=5, reason=reason)
    mols = [m.name for m in S["mols"]]
    rec["values"] = np.array([res["params"][m][p] for m in mols for p in PARAMS])
    rec["errors"] = np.array([res["errors"][m][p] for m in mols for p in PARAMS])
    rec["tau_max"] = np.array([res["tau_max"][m] for m in mols])
    rec["at_bound"] = np.array([sum(1 << (PARAMS.index(p) + 5 * (side == "upper"))
                                    for p, side in res["at_bound"][m].items()) for m in mols],
                               dtype=float)  # fmt: skip
    rec["dchi2"] = np.array([res["detection"][m]["dchi2"] for m in mols])
    code, reason = (0, "") if res["status"] == "ok" else (6, str(res["status"]))
    return rec | dict(code=code, reason=reason, loss=res["loss"], nfev=res["nfev"],
                      time_s=res["time_s"])  # fmt: skip


def fit_batch(pixels: list) -> list[dict]:
    """Worker task: fit the pixels [(y, x) or (y, x, starts), ...] with the initializer's data."""
    out = []
    for y, x, *starts in pixels:
        t0 = time.process_time()  # CPU seconds of this one-thread process: robust to load
        rec = fit_pixel(_SHARED, y, x, *starts)
        out.append(rec | dict(cpu_s=time.process_time() - t0))
    return out


def with_network_starts(S: dict, pixels: list, todo: set, size: int, policy, chunk: int = 64):
    """Yield batches of `size` todo pixels, each with its network starts (nn methods, §7).

    The parent runs the network over `chunk` pixels at a time (one batched encoder call) while
    the workers fit the batches already handed out. Chunks are fixed blocks of all selected
    `pixels` (done ones included), so a resumed run draws exactly the same starts.
    """
    kw = S["fit_kwargs"]
    for i in range(0, len(pixels), chunk):
        block = pixels[i : i + chunk]
        if not todo.intersection(block):
            continue
        spectra, seeds = [], []
        for y, x in block:
            spec = S["data"][:, y, x].astype(float)
            rms = pixel_rms(S, y, x, spec) if np.isfinite(spec).any() else np.nan
            usable = np.isfinite(rms) and rms > 0
            spectra.append(pixel_windows(S, y, x, rms) if usable else [])  # [] -> a reason
            seeds.append(pixel_seed(S, y, x))
        starts = spectuner.policy_starts(spectra, S["mols"], kw["n_init"], seeds, policy,
                                         kw["bounds"], kw["fix"], kw["v_lsr_kms"])  # fmt: skip
        mine = [(y, x, st) for (y, x), st in zip(block, starts) if (y, x) in todo]
        for k in range(0, len(mine), size):
            yield mine[k : k + size]


def fit_batch_dask(shared: dict, pixels: list) -> list[dict]:
    """Dask task: the shared data arrives once per worker (scattered), then as fit_batch."""
    if _SHARED.get("token") != shared["token"]:
        _init_worker(shared, in_pool=False)
    return fit_batch(pixels)


# --- runners: the same tasks in this process, a process pool, or Dask distributed ---


def run_inprocess(shared: dict, batches: list, cfg: Config):
    """Yield each batch's results, computed here (--workers 1), BLAS and torch on one thread.

    OpenBLAS gives other last digits with several threads, so for results identical to the
    pool's, BLAS is limited with threadpoolctl (optional) or OPENBLAS_NUM_THREADS=1.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
        if not cfg.quiet and os.environ.get("OPENBLAS_NUM_THREADS") != "1":
            print("note: without threadpoolctl or OPENBLAS_NUM_THREADS=1, --workers 1 may differ "
                  "in the last digits from runs with a pool", file=sys.stderr)  # fmt: skip
    _init_worker(shared, in_pool=False)
    torch = sys.modules.get("torch")
    n_threads = torch.get_num_threads() if torch else 0
    limits = threadpool_limits(1) if threadpool_limits else None
    try:
        if torch:
            torch.set_num_threads(1)
        for batch in batches:
            yield fit_batch(batch)
    finally:
        _SHARED.clear()
        if torch:
            torch.set_num_threads(n_threads)
        if limits:
            limits.restore_original_limits()


def run_pool(shared: dict, batches: list, cfg: Config):
    """Yield results from `cfg.workers` spawned processes; BLAS/OpenMP one thread each."""
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update({k: "1" for k in THREAD_VARS})  # inherited by the spawned workers
    pool = ProcessPoolExecutor(cfg.workers, get_context("spawn"), _init_worker,
                               (shared, True, os.getpid()))  # fmt: skip
    try:
        pending = set()
        for b in batches:  # a generator may still be drawing network starts: keep workers fed
            pending.add(pool.submit(fit_batch, b))
            while len(pending) >= 4 * cfg.workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)
        for future in as_completed(pending):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def run_dask(shared: dict, batches: list, cfg: Config):
    """Yield results from Dask distributed's concurrent.futures executor (optional dependency)."""
    from dask.distributed import Client, LocalCluster

    local = cfg.scheduler == "local"
    cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                           dashboard_address=None) if local else None  # fmt: skip
    client = Client(cluster if local else cfg.scheduler)
    try:
        shared_future = client.scatter([shared], broadcast=True)[0]
        executor = client.get_executor()
        for future in as_completed([executor.submit(fit_batch_dask, shared_future, b)
                                    for b in batches]):  # fmt: skip
            yield future.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


RUNNERS = {"inprocess": run_inprocess, "pool": run_pool, "dask": run_dask}


# --- chunks on disk: whole chunks survive Ctrl-C or a crash, --resume reads them back ---

REC_KEYS = ("y", "x", "code", "reason", "rms", "n_peaks", "loss", "nfev", "time_s", "cpu_s",
            "values", "errors", "tau_max", "at_bound", "dchi2")  # fmt: skip


def flush_chunk(folder: Path, records: list) -> None:
    """Write the records as the next chunk file, atomically (write, then rename); empty them."""
    if not records:
        return
    folder.mkdir(parents=True, exist_ok=True)
    n = 1 + max((int(p.stem[6:]) for p in folder.glob("chunk_*.npz")), default=0)
    tmp = folder / f"tmp_{n:06d}.npz"
    np.savez(tmp, **{k: np.array([r[k] for r in records]) for k in REC_KEYS})
    os.replace(tmp, folder / f"chunk_{n:06d}.npz")
    records.clear()


def load_chunks(folder: Path) -> dict:
    """All records in folder's chunk files, concatenated per key (empty arrays if none)."""
    parts = []
    for path in sorted(folder.glob("chunk_*.npz")):
        with np.load(path) as z:
            missing = np.full((z["y"].size, z["values"].shape[-1] // 5), np.nan)  # older chunks
            parts.append({k: z[k] if k in z.files else missing for k in REC_KEYS})
    if not parts:
        return {k: np.zeros((0,)) for k in REC_KEYS}
    return {k: np.concatenate([p[k] for p in parts]) for k in REC_KEYS}


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


def file_sha256(path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def write_outputs(out: Path, S: dict, cube: dict, cfg: Config, info: dict, complete: bool) -> dict:
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


def make_demo(path: str, n_pix: int = 8, n_chan: int = 440, seed: int = 0) -> dict:
    """Write a synthetic CH3OH cube made with lte.spectrum: Jy/beam, RA/DEC/FREQ/STOKES.

    Smooth maps (a warm dense core, a velocity gradient, widths rising with y), v_lsr = 5 km/s
    in the header (VELO-LSR), channels of 0.5 MHz from 241.690 GHz, Gaussian noise of 1 mJy/beam
    (0.1 K), 8 blanked channels and one blank pixel. The injected maps are stored as image
    extensions TRUE_<param> so that a fit can be checked against them.

    Returns:
        the injected maps {param: (n_pix, n_pix)}.
    """
    v_lsr, bmaj, bmin = 5.0, 0.5, 0.4  # km/s, arcsec, arcsec
    freq_MHz = 241690.0 + 0.5 * np.arange(n_chan)
    yy, xx = np.mgrid[:n_pix, :n_pix] / max(n_pix - 1, 1)
    r2 = (yy - 0.5) ** 2 + (xx - 0.5) ** 2
    truth = dict(eta=0.5 + 0.4 * np.exp(-r2 / 0.1), T_ex=70.0 + 130.0 * np.exp(-r2 / 0.08),
                 N_tot=10 ** (15.7 + 1.1 * np.exp(-r2 / 0.12)), delta_v=2.0 + 2.0 * yy,
                 v_off=-1.5 + 3.0 * xx)  # fmt: skip
    truth["N_tot"][xx + yy > 1.75] = 1e12  # a corner without the molecule: skipped pixels
    span = lte.reach_kms(12.0, 30.0) / lte.C_KMS  # every line that can reach the band
    rest = freq_MHz * (1 + v_lsr / lte.C_KMS)
    mol = lte.load_molecule("CH3OH", freq_range_MHz=(rest[0] * (1 - span), rest[-1] * (1 + span)))
    P = np.stack([truth[p] for p in PARAMS], axis=-1).reshape(-1, 5)
    T_K = lte.spectrum(rest, mol, P).T.reshape(n_chan, n_pix, n_pix)
    K_per_Jy = K_PER_JY / ((freq_MHz / 1e3) ** 2 * bmaj * bmin)
    rng = np.random.default_rng(seed)
    data = T_K / K_per_Jy[:, None, None] + rng.normal(0.0, 0.001, T_K.shape)
    data[200:208], data[:, n_pix - 1, 0] = np.nan, np.nan
    header = fits.Header()
    cards = dict(BUNIT="Jy/beam", BMAJ=bmaj / 3600, BMIN=bmin / 3600, BPA=0.0, OBJECT="DEMO",
                 CTYPE1="RA---SIN", CRVAL1=248.0946, CDELT1=-0.1 / 3600, CRPIX1=n_pix / 2 + 0.5,
                 CUNIT1="deg", CTYPE2="DEC--SIN", CRVAL2=-24.4757, CDELT2=0.1 / 3600,
                 CRPIX2=n_pix / 2 + 0.5, CUNIT2="deg", CTYPE3="FREQ", CRVAL3=freq_MHz[0] * 1e6,
                 CDELT3=0.5e6, CRPIX3=1.0, CUNIT3="Hz", CTYPE4="STOKES", CRVAL4=1.0, CDELT4=1.0,
                 CRPIX4=1.0, SPECSYS="LSRK", RESTFRQ=241791.352e6, RADESYS="ICRS")  # fmt: skip
    header.update(cards)
    header["VELO-LSR"] = (v_lsr * 1e3, "[m/s] systemic velocity")
    header["HISTORY"] = f"made by: python fit_cube.py make_demo OUT {n_pix} {n_chan} (seed {seed})"
    hdus = [fits.PrimaryHDU(data[None].astype(np.float32), header)]
    hdus += [fits.ImageHDU(truth[p], name=f"TRUE_{p.upper()}") for p in PARAMS]
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return truth


# --- checks made before the first pixel ---

OUT_FILES = ("run.json", "summary.json", "failures.csv", "metrics.csv", "quicklook.png")


def resolve_workers(requested: int, cores: int) -> tuple[int, str]:
    """(worker count, note): 0 = all cores; more than 4 x the cores is capped there, with a note.

    Raises:
        ValueError: a negative count.
    """
    if requested < 0:
        raise ValueError(f"--workers {requested}: expected 0 (all {cores} cores) or a count >= 1")
    if requested > 4 * cores:
        return 4 * cores, f"--workers {requested} capped to {4 * cores} (4 x the {cores} cores)"
    return requested or cores, ""


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an --out that is (or lies under) a file, or that holds an earlier run, unless
    --resume (continue it) or --overwrite (replace it) is given.

    Raises:
        ValueError: as above, or both --resume and --overwrite.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite: give one (continue the run in --out, or "
                         "replace it)")  # fmt: skip
    first = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not first.is_dir():
        raise ValueError(f"--out {out}: {first} is a file; expected a folder (made if missing)")
    if (out / "run.json").exists() or any(out.glob("chunks/chunk_*.npz")):
        if not (resume or overwrite):
            raise ValueError(f"--out {out} holds the results of an earlier run: continue it "
                             "with --resume, replace it with --overwrite, or choose another "
                             "--out")  # fmt: skip


def clear_out(out: Path) -> None:
    """Delete what an earlier run wrote in out (chunks, maps, logs); other files are kept."""
    ours = [*out.glob("chunks/*.npz"), *(out / n for n in OUT_FILES if (out / n).exists())]
    for path in out.glob("*.fits"):
        try:
            ours += [path] if fits.getheader(path).get("ORIGIN") == "fit_cube.py" else []
        except (OSError, ValueError):
            continue  # not ours
    for path in ours:
        path.unlink()


# --- main ---


def main(cfg: Config) -> dict:
    """Fit every selected pixel of cfg.cube and write the maps (see the module docstring)."""
    t_start = time.time()
    log = (lambda s: None) if cfg.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    # --- data ---
    if not cfg.mol:
        raise ValueError("no molecule: give --mol NAME (e.g. --mol CH3OH)")
    method, note = spectuner.resolve_method(cfg.method, cfg.policy or None)
    if note:
        log(f"note: {note}")
    cfg = dataclasses.replace(cfg, method=method)
    if cfg.method not in spectuner.METHODS or cfg.loss not in spectuner.LOSSES:
        raise ValueError(f"--method {cfg.method!r} / --loss {cfg.loss!r}: expected one of "
                         f"{sorted(spectuner.METHODS)} / {sorted(spectuner.LOSSES)}")  # fmt: skip
    if cfg.n_init < 1:
        raise ValueError(f"--n_init {cfg.n_init}: expected a number of starts >= 1")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers, note = resolve_workers(cfg.workers, cores)
    if note:
        log(f"note: {note}")
    stem = re.sub(r"\.fits?(\.gz)?$", "", Path(cfg.cube).name, flags=re.I)
    out = Path(cfg.out or f"{stem}_fit")
    check_out(out, cfg.resume, cfg.overwrite)
    cube = read_cube(cfg.cube, cfg.bunit)
    n_chan, ny, nx = cube["data"].shape
    if np.isfinite(cfg.v_lsr):
        v_lsr, v_from = cfg.v_lsr, "--v_lsr"
    elif cube["v_lsr_kms"] is not None:
        v_lsr, v_from = cube["v_lsr_kms"], "header"
    else:
        v_lsr, v_from = 0.0, "default (none in the header)"
    cfg = dataclasses.replace(cfg, v_lsr=v_lsr, workers=workers, out=str(out))
    log(f"cube={cfg.cube} shape=({n_chan}, {ny}, {nx}) unit={cube['unit']} "
        f"specsys={cube['specsys'] or 'unset'} freq_MHz={cube['freq_MHz'].min():.3f}:"
        f"{cube['freq_MHz'].max():.3f} v_lsr={v_lsr:g} km/s (from {v_from})")  # fmt: skip
    selected = np.ones((ny, nx), bool)
    if cfg.region:
        box = np.zeros_like(selected)
        box[parse_region(cfg.region, (ny, nx))] = True
        selected &= box
    if cfg.mask:
        mask = read_plane(cfg.mask, (ny, nx), "mask")[0]
        selected &= np.isfinite(mask) & (mask != 0)
    if not np.isfinite(cube["data"]).any():
        raise ValueError(f"cube {cfg.cube} has no finite value (all NaN or inf): nothing to fit")
    if not selected.any():
        raise ValueError(f"--region {cfg.region!r} / --mask {cfg.mask!r} select no pixel")
    rms = None
    if cfg.rms:
        try:
            rms = np.full((ny, nx), float(cfg.rms))
        except ValueError:
            rms = read_plane(cfg.rms, (ny, nx), "noise")[0]
        if not (rms[selected] > 0).any():  # NaN compares False
            raise ValueError(f"--rms {cfg.rms}: expected a noise > 0 (in {cube['unit']}) in the "
                             "selected pixels")  # fmt: skip
    T_bg = read_continuum(cfg.continuum, cube) if cfg.continuum else np.zeros((ny, nx))
    # --- model: molecules, fit options ---
    rest = cube["freq_MHz"] * (1 + v_lsr / lte.C_KMS)
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
                             f"{lo:.1f}-{hi:.1f} MHz (v_lsr {v_lsr:g} km/s, "
                             f"+-{span * lte.C_KMS:.0f} km/s)")  # fmt: skip
    fit_kwargs = dict(method=cfg.method, loss=cfg.loss, n_init=cfg.n_init, n_refine=cfg.n_refine,
                      bounds=bounds, fix=fix, v_lsr_kms=v_lsr, dish_m=cfg.dish_m or None,
                      policy=cfg.policy or None)  # fmt: skip
    beams = cube["beam_arcsec"]
    S = dict(token=uuid.uuid4().hex, data=cube["data"], freq_MHz=cube["freq_MHz"],
             K_per_unit=cube["K_per_unit"], T_bg=T_bg, rms=rms, mols=mols, fit_kwargs=fit_kwargs,
             beam_arcsec=float(np.median(np.sqrt(beams.prod(1)))) if beams is not None else None,
             seed=cfg.seed, peak_snr=cfg.peak_snr, min_peaks=cfg.min_peaks,
             min_channels=cfg.min_channels, selected=selected)  # fmt: skip
    # --- resume or start afresh ---
    run_key = dict(cube_sha256=file_sha256(cfg.cube), **{k: getattr(cfg, k) for k in RESUME_KEYS})
    chunks = out / "chunks"
    if cfg.resume and (out / "run.json").exists():
        old = json.loads((out / "run.json").read_text())
        diff = sorted(k for k in run_key if old.get(k) != run_key[k])
        if diff:
            raise ValueError(f"--resume: {out} holds a run with other {diff}; use another --out")
    elif cfg.overwrite:
        clear_out(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(run_key, indent=1))
    done = load_chunks(chunks)
    is_done = np.zeros((ny, nx), bool)
    is_done[done["y"].astype(int), done["x"].astype(int)] = True
    todo = [tuple(map(int, p)) for p in np.argwhere(selected & ~is_done)]
    size = max(1, min(4, len(todo) // (8 * workers)))  # small tasks: Ctrl-C waits <= 4 fits
    batches = [todo[i : i + size] for i in range(0, len(todo), size)]
    if cfg.method.startswith("nn") and batches:  # the network runs here, in batches of pixels
        policy = cfg.policy or spectuner.DEFAULT_POLICY
        spectuner.load_policy(str(policy))  # a missing file stops the run here, not per pixel
        pixels = [tuple(map(int, p)) for p in np.argwhere(selected)]
        batches = with_network_starts(S, pixels, set(todo), size, policy)
    kind = "dask" if cfg.scheduler else ("pool" if workers > 1 else "inprocess")
    log(f"pixels={int(selected.sum())} done_before={int(is_done.sum())} todo={len(todo)} "
        f"runner={kind} workers={workers} mol={cfg.mol} method={cfg.method}")  # fmt: skip
    # --- loop ---
    buffer, n_done, n_fail, t_log, complete, first_failure = [], 0, 0, time.time(), False, ""
    t_fit = time.time()
    try:
        for results in RUNNERS[kind](S, batches, cfg):
            buffer += results
            n_done += len(results)
            for r in results:
                if r["code"] == 5 and not n_fail:
                    first_failure = r["reason"]
                    log(f"first failure: {first_failure}")
                n_fail += int(r["code"] == 5)
            if len(buffer) >= cfg.flush_every:
                flush_chunk(chunks, buffer)
            if time.time() - t_log >= cfg.log_every_s or n_done == len(todo):
                t_log, rate = time.time(), n_done / max(time.time() - t_fit, 1e-9)
                fields = dict(pixels=f"{n_done}/{len(todo)}", rate=f"{rate:.3g}/s",
                              eta=f"{(len(todo) - n_done) / rate:.0f}s", failed=n_fail)  # fmt: skip
                log(" ".join(f"{k}={v}" for k, v in fields.items()))
                if not (out / "metrics.csv").exists():
                    (out / "metrics.csv").write_text("time_s,done,todo,pixels_per_s,failed\n")
                with open(out / "metrics.csv", "a") as fh:
                    fh.write(f"{t_log - t_start:.2f},{n_done},{len(todo)},{rate:.4g},{n_fail}\n")
        complete = True
    finally:
        flush_chunk(chunks, buffer)
        wall = time.time() - t_fit
        versions = dict(python=platform.python_version(), numpy=np.__version__,
                        scipy=scipy.__version__, astropy=astropy.__version__)  # fmt: skip
        versions |= {k: sys.modules[k].__version__ for k in ("torch", "dask") if k in sys.modules}
        catalogue = [dict(name=m.name, source=m.source, n_lines=int(m.freq_MHz.size),
                          sha256=file_sha256(m.source) if Path(m.source).is_file() else None)
                     for m in mols]  # fmt: skip
        beam = None if beams is None else np.median(beams, axis=0).tolist()
        info = dict(config=dataclasses.asdict(cfg), argv=sys.argv, versions=versions,
                    input=dict(cube=str(cfg.cube), sha256=run_key["cube_sha256"],
                               shape=list(cube["shape"]), unit=cube["unit"],
                               specsys=cube["specsys"], restfrq_Hz=cube["restfrq_Hz"],
                               freq_MHz=[float(cube["freq_MHz"][0]), float(cube["freq_MHz"][-1])],
                               beam_arcsec=beam, v_lsr_kms=v_lsr, v_lsr_from=v_from,
                               descending=cube["descending"]),
                    catalogue=catalogue,
                    timing=dict(wall_s=wall, total_s=time.time() - t_start, workers=workers,
                                pixels_this_run=n_done, pixels_per_s=n_done / max(wall, 1e-9),
                                core_s_per_pixel=wall * workers / max(n_done, 1)))  # fmt: skip
        summary = write_outputs(out, S, cube, cfg, info, complete)
        print(summary["summary_line"] + f" wall={wall:.1f}s out={out}", flush=True)
    summary["first_failure"] = first_failure
    return summary


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
        prog="fit_cube.py", description=__doc__.split("\n\n")[0],
        usage="%(prog)s CUBE --mol M [M ...] [options]\n"
              "       %(prog)s make_demo OUT [N_PIX N_CHAN]",
        epilog=__doc__.split("\n\n", 2)[2].replace("%", "%%"),
        formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)  # fmt: skip
    required = parser.add_argument_group("required")
    required.add_argument("cube", help=helps["cube"])
    options = parser.add_argument_group("options")
    options.add_argument("-h", "--help", action="help", help="show this help and exit")
    for f in dataclasses.fields(Config)[1:]:
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if isinstance(default, list):
            kind = dict(nargs="+", action="extend", metavar=f.name.upper())
        elif isinstance(default, bool):
            kind = dict(action="store_true")
        else:
            kind = dict(type=type(default))
        shown = "none" if default == [] else repr(default) if default == "" else default
        text = f"{helps[f.name]} (default: {shown})"
        text = f"required: {helps[f.name]}" if f.name == "mol" else text
        group = required if f.name == "mol" else options
        group.add_argument(f"--{f.name}", default=default, help=text.replace("%", "%%"), **kind)
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
