"""The output folder of a cube fit: chunks of pixel records, --resume and --overwrite.

Records are written in whole chunk files (written, then renamed), so a run stopped by Ctrl-C,
SIGTERM or a crash keeps every finished chunk, and --resume reads them back and fits only the
pixels that are missing, after checking that the cube (SHA-256) and the fit options are those
of the run it continues (docs/method.md §9).

    import cube_store
    records = cube_store.load_chunks(Path("demo_cube_fit/chunks"))  # {key: array per pixel}
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from astropy.io import fits

RESUME_KEYS = tuple(  # options a resumed run must share with the run it continues
    "mol catalog method policy loss n_init n_refine bounds fix v_lsr dish_m continuum rms bunit "
    "min_peaks peak_snr min_channels seed maxiter neighbours".split()
)
LATER_KEYS = {"maxiter": 100, "neighbours": False}  # options added since: a run.json without
# them used this default


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


def file_sha256(path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- checks made before the first pixel ---

OUT_FILES = ("run.json", "summary.json", "failures.csv", "metrics.csv", "quicklook.png")


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


def start_or_resume(out: Path, cfg) -> dict:
    """The run key (the cube's SHA-256 and the RESUME_KEYS options of cfg, a fit_cube.Config),
    written to out/run.json: checked against the run in out with --resume; with --overwrite
    the earlier results are deleted first.

    Raises:
        ValueError: --resume of a run with another cube or other options.
    """
    run_key = dict(cube_sha256=file_sha256(cfg.cube), **{k: getattr(cfg, k) for k in RESUME_KEYS})
    if cfg.resume and (out / "run.json").exists():
        old = json.loads((out / "run.json").read_text())
        diff = sorted(k for k in run_key if old.get(k, LATER_KEYS.get(k)) != run_key[k])
        if diff:
            raise ValueError(f"--resume: {out} holds a run with other {diff}; use another --out")
    elif cfg.overwrite:
        clear_out(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(run_key, indent=1))
    return run_key


def pixels_to_do(selected: np.ndarray, done: dict) -> tuple[np.ndarray, list]:
    """(is_done (Y, X) bool: a record exists, the selected pixels [(y, x), ...] without one)."""
    is_done = np.zeros(selected.shape, bool)
    is_done[done["y"].astype(int), done["x"].astype(int)] = True
    return is_done, [tuple(map(int, p)) for p in np.argwhere(selected & ~is_done)]
