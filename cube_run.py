"""Fitting the pixels of a cube: one pixel, the workers that fit them, the loop over batches.

fit_pixel estimates a pixel's noise, keeps it when it has enough peaks and fits it with
spectuner.fit_spectrum (docs/method.md §9); a fit that raises becomes status 5 with its reason.
The run's read-only data go to each worker once (the pool initializer); tasks are batches of
pixel indices, fitted in this process (--workers 1), in a process pool, or on Dask distributed,
with identical results; for the nn methods the network's starts are drawn here in batches
(with_network_starts). run_pixels feeds the results to the chunks on disk (cube_store.py).

    import cube_run
    for results in cube_run.RUNNERS["pool"](shared, batches, cfg): ...
"""

import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, as_completed, wait
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from scipy.signal import find_peaks

import spectuner  # fit_spectrum through the module, so that a test can stand in for it
from cube_store import flush_chunk

PARAMS = spectuner.PARAM_NAMES  # eta, T_ex, N_tot, delta_v, v_off
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


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


def fit_pixel(S: dict, y: int, x: int, starts=None, override=None) -> dict:
    """Noise, selection and fit of pixel (y, x); a fit that raises becomes status 5.

    starts: the network's starts for this pixel (nn methods), drawn in the parent in batches.
    override: fit_spectrum options replacing the run's for this pixel (cube_passes.py: pass 2).
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
        kw = S["fit_kwargs"] | (override or {})
        res = spectuner.fit_spectrum(pixel_windows(S, y, x, rec["rms"]), S["mols"], seed=seed,
                                     starts=starts, **kw)  # fmt: skip
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


def run_inprocess(shared: dict, batches: list, cfg):
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


def run_pool(shared: dict, batches: list, cfg):
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


def run_dask(shared: dict, batches: list, cfg):
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


RUNNERS = {"inprocess": run_inprocess, "pool": run_pool, "dask": run_dask}


# --- the loop: batches of pixels to the runner, records to the chunks on disk ---


def task_size(n_todo: int, workers: int) -> int:
    """Pixels per task: small, so that Ctrl-C waits for at most 4 fits."""
    return max(1, min(4, n_todo // (8 * workers)))


def plan_batches(S: dict, todo: list, workers: int, method: str, policy: str):
    """Tasks of a few todo pixels each, or for the nn methods a generator of them with the
    network's starts (with_network_starts: the network runs in this process).

    Raises:
        FileNotFoundError: no policy file (said once here, not in every pixel).
    """
    size = task_size(len(todo), workers)
    batches = [todo[i : i + size] for i in range(0, len(todo), size)]
    if method.startswith("nn") and batches:  # the network runs here, in batches of pixels
        policy = policy or spectuner.DEFAULT_POLICY
        spectuner.load_policy(str(policy))  # a missing file stops the run here, not per pixel
        pixels = [tuple(map(int, p)) for p in np.argwhere(S["selected"])]
        batches = with_network_starts(S, pixels, set(todo), size, policy)
    return batches


def run_pixels(S: dict, batches, cfg, kind: str, n_todo: int, out: Path, log, progress: dict):
    """Fit the batches with RUNNERS[kind], writing every cfg.flush_every records as a chunk
    of out/chunks and a progress line every cfg.log_every_s seconds (log_progress).

    progress (done, failed, first_failure, t_fit) is updated as the results arrive, so that
    the caller has it when Ctrl-C or SIGTERM stops the loop; the records not yet written are
    then written before the interrupt goes on.
    """
    buffer, t_log = [], time.time()
    try:
        for results in RUNNERS[kind](S, batches, cfg):
            buffer += results
            progress["done"] += len(results)
            for r in results:
                if r["code"] == 5 and not progress["failed"]:
                    progress["first_failure"] = r["reason"]
                    log(f"first failure: {r['reason']}")
                progress["failed"] += int(r["code"] == 5)
            if len(buffer) >= cfg.flush_every:
                flush_chunk(out / "chunks", buffer)
            if time.time() - t_log >= cfg.log_every_s or progress["done"] == n_todo:
                t_log = time.time()
                log_progress(out, progress, n_todo, t_log, log)
    finally:
        flush_chunk(out / "chunks", buffer)


def log_progress(out: Path, progress: dict, n_todo: int, now: float, log) -> None:
    """A `pixels= rate= eta= failed=` line through log, and the same as a row of metrics.csv."""
    n_done, n_fail = progress["done"], progress["failed"]
    rate = n_done / max(now - progress["t_fit"], 1e-9)
    fields = dict(pixels=f"{n_done}/{n_todo}", rate=f"{rate:.3g}/s",
                  eta=f"{(n_todo - n_done) / rate:.0f}s", failed=n_fail)  # fmt: skip
    log(" ".join(f"{k}={v}" for k, v in fields.items()))
    if not (out / "metrics.csv").exists():
        (out / "metrics.csv").write_text("time_s,done,todo,pixels_per_s,failed\n")
    with open(out / "metrics.csv", "a") as fh:
        fh.write(f"{now - progress['t_start']:.2f},{n_done},{n_todo},{rate:.4g},{n_fail}\n")
