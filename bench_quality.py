"""Benchmarks of the fits' quality, run by bench.py: recovery of synthetic truths, the realism of
the line forests, upper limits on N_tot, and the coverage of the errors (docs/benchmarks.md).

python bench.py recover  # how often each optimiser recovers synthetic CH3OH truths (issue 3)
python bench.py forest   # line statistics of forest.py's hot_corino vs IRAS 16293-2422 B (issue 11)
python bench.py limits   # detection rate and coverage of the N_tot upper limits (issue 15)
python bench.py coverage --kind forest  # coverage of the errors in line forests (issue 14)

Each benchmark prints `key=value` lines; with small n (n_cases, n_seeds) it runs in seconds, as
tests/test_bench.py does.
"""

import time
from pathlib import Path

import numpy as np

import lte

SHARED = Path(__file__).resolve().parent.parent / "shared" / "data"
CLEAN_GRIDS_MHZ = ((241700, 241900, 0.15), (96700, 96780, 0.06))  # the tests' two windows
FOREST_N_TOT = (1e12, 1e23)  # N_tot box [cm^-2] of the forest coverage: the hot_corino preset
# puts CH3OH at 1e21-1e22, above the default box's 1e20, where a fit could not reach the truth


def clean_case(rng, mol, grids: list, box) -> tuple:
    """One clean synthetic CH3OH spectrum on grids: truth (5,) uniform in the central 80 % of the
    unit cube of docs/method.md §3, peak S/N log-uniform in 20-200. Returns (truth, noiseless
    spectra per grid, rms [K], noisy spectuner.Window per grid)."""
    import spectuner

    truth = spectuner.to_physical(rng.uniform(0.1, 0.9, (1, 5)), box)[0]
    T = [lte.spectrum(f, mol, truth[None])[0] for f in grids]
    rms = max(t.max() for t in T) / 10 ** rng.uniform(np.log10(20), np.log10(200))
    windows = [spectuner.Window(f, t + rng.normal(0, rms, f.size), rms)
               for f, t in zip(grids, T)]  # fmt: skip
    return truth, T, rms, windows


def _recover_fit(windows, mol, truth, method: str, restarts: int, case: int) -> tuple:
    """One chi2 fit of bench_recover: (ok, loss, nfev, time_s, warned, detail of the worst z)."""
    import spectuner

    names = spectuner.PARAM_NAMES
    res = spectuner.fit_spectrum(windows, [mol], method, "chi2", seed=case, pso_restarts=restarts)
    est, err = res["params"]["CH3OH"], res["errors"]["CH3OH"]
    z = np.array([(est[k] - t) / err[k] for k, t in zip(names, truth)])
    ok = np.isfinite(z[[1, 3, 4]]).all() and np.all(np.abs(np.nan_to_num(z)) < 3)
    warned = "nearly thin" in res["error_notes"]["CH3OH"].get("N_tot", "")
    worst = int(np.argmax(np.abs(np.nan_to_num(z))))
    detail = f"tau_max={res['tau_max']['CH3OH']:.2g},{names[worst]}_z={z[worst]:.1f}"
    return ok, res["loss"], res["nfev"], res["time_s"], warned, detail


def bench_recover(n_cases: int = 100, seed: int = 7) -> None:
    """Recovery of the truth on synthetic CH3OH spectra (issue 3): the two windows of the tests
    (J=5-4 at 241.8 GHz, J=2-1 at 96.7 GHz), truths uniform in the central 80 % of the unit
    cube of docs/method.md §3, peak S/N log-uniform in 20-200, chi2 loss. A fit is `recovered` when
    every parameter with a finite error lies within 3 sigma of the truth (T_ex, delta_v and
    v_off must have one); a failure is `missed` when its chi2 is above that of the truth, or of
    the best fit any method found, by more than 1 (the optimiser stopped short of the minimum),
    else `outside` (the minimum was found; its errors do not cover the truth). `warned`: fits
    whose eta and N_tot errors carry the nearly-thin-lines warning of fit_spectrum."""
    import spectuner

    mol = lte.load_molecule("CH3OH", freq_range_MHz=(96000, 242000))
    grids = [np.arange(*g) for g in CLEAN_GRIDS_MHZ]
    n_chan = sum(g.size for g in grids)
    box, names = spectuner.make_box(["CH3OH"], None, None), spectuner.PARAM_NAMES
    runs = [("random+slsqp", 1), ("pso", 1), ("pso+slsqp", 1), ("pso", 3), ("pso+slsqp", 3)]
    tally = {run: [] for run in runs}  # (recovered, missed, nfev, time_s, warned)
    rng = np.random.default_rng(seed)
    for case in range(n_cases):
        truth, T, rms, windows = clean_case(rng, mol, grids, box)
        fits = {run: _recover_fit(windows, mol, truth, *run, case) for run in runs}
        at_truth = spectuner.model_windows(windows, [mol], {"CH3OH": dict(zip(names, truth))})
        loss_truth = sum(
            spectuner.loss_chi2(m, w.T_obs_K, rms)[0] for m, w in zip(at_truth, windows)
        )
        best = min(loss_truth, *(f[1] for f in fits.values()))
        labels = []
        for (method, restarts), (ok, loss, nfev, time_s, warned, detail) in fits.items():
            # the loss is a sum of 0.5 mean chi2 over two equal windows: chi2 = loss * n_chan
            missed = not ok and (loss - best) * n_chan > 1.0
            tally[method, restarts].append((ok, missed, nfev, time_s, warned))
            label = "ok" if ok else "missed" if missed else "outside"
            if label == "outside":  # what the errors missed, and the truth's chi2 above the fit's
                label += f"[{detail},dchi2_truth={(loss_truth - loss) * n_chan:.1f}]"
            labels.append(f"{method}x{restarts}={label}{'(warned)' if warned else ''}")
        snr = max(t.max() for t in T) / rms
        print(f"case={case} snr={snr:.0f} " + " ".join(labels), flush=True)
    for (method, restarts), rows in tally.items():
        a = np.array(rows, dtype=float)
        outside = (1 - a[:, 0]) * (1 - a[:, 1])
        print(
            f"method={method} restarts={restarts} cases={len(a)} recovered={a[:, 0].mean():.3f} "
            f"missed={a[:, 1].sum():.0f} outside={outside.sum():.0f} "
            f"warned={a[:, 4].sum():.0f} outside_warned={(outside * a[:, 4]).sum():.0f} "
            f"mean_nfev={a[:, 2].mean():.0f} mean_time_s={a[:, 3].mean():.2f}",
            flush=True,
        )


def bench_forest(n_seeds: int = 200, preset: str = "hot_corino", band: int = 6) -> None:
    """Realism of forest.py (issue 11): line statistics (forest.line_stats) of n_seeds one-window
    states of the preset in the band against the 10 real IRAS 16293-2422 B Band 6 windows; a
    statistic is bracketed when the real median lies in the simulated 10-90 % range. Writes
    results/bench_forest.txt and results/forest_vs_real.png (a simulated window above a real
    one)."""
    import csv

    import forest

    folder = SHARED / "spectra" / "iras16293b"
    real = []
    with open(folder / "windows.csv") as fh:
        for row in csv.DictReader(fh):
            f, T = np.loadtxt(folder / f"spw{row['spw']}.dat", unpack=True)
            real.append((f, T, float(row["rms_K"])))
    mols = forest.load_forest_molecules(SHARED / "catalogs")
    t0 = time.perf_counter()
    sims = [forest.draw_forest(s, mols, preset=preset, band=band)[0][0] for s in range(n_seeds)]
    wall_s = time.perf_counter() - t0
    sim_stats = [forest.line_stats(w.T_obs_K, w.rms_K) for w in sims]
    real_stats = [forest.line_stats(T, rms) for _, T, rms in real]
    lines = [f"# python bench.py forest: preset={preset} band={band} seeds={n_seeds} "
             f"molecules={len(mols)} draw_s_per_state={wall_s / n_seeds:.3f}",
             "stat real_median real_min real_max sim_q10 sim_q50 sim_q90 bracketed"]  # fmt: skip
    for key in sim_stats[0]:
        s = np.nanquantile([x[key] for x in sim_stats], [0.1, 0.5, 0.9])
        r = [x[key] for x in real_stats]
        inside = s[0] <= np.median(r) <= s[2]
        lines.append(f"{key} {np.median(r):.3g} {min(r):.3g} {max(r):.3g} "
                     f"{s[0]:.3g} {s[1]:.3g} {s[2]:.3g} {'yes' if inside else 'no'}")  # fmt: skip
    rng, ref = np.random.default_rng(0), []  # literature columns on the real channels (rest)
    for f, _, rms in real:
        p = {n: [0.3, 200.0, 1e19 * 10 ** (forest.SPECIES[n][2] + 0.5 * (n != "CH3OH")), 1.0, 0.0]
             for n in mols}  # fmt: skip
        T = forest.forest_spectrum(f * (1 + 2.7 / lte.C_KMS), mols, p, 5.0)
        ref.append(forest.line_stats(T + rng.normal(0.0, rms, T.size), rms)["peaks_per_1000"])
    lines.append(f"# literature columns (N(CH3OH) = 1e19, PILS ratios, others 0.5 dex above the "
                 f"low end of their range; eta 0.3, T_ex 200 K, FWHM 1 km/s) on the real "
                 f"channels: peaks_per_1000 median={np.median(ref):.3g}")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "bench_forest.txt").write_text(text + "\n")
    k = int(np.argsort([x["peaks_per_1000"] for x in sim_stats])[n_seeds // 2])  # median state
    sim = (sims[k].freq_MHz, sims[k].T_obs_K, sims[k].rms_K)
    _forest_figure(out / "forest_vs_real.png", sim, f"{preset} seed {k}", real[0])
    print(f"wrote={out / 'bench_forest.txt'} figure={out / 'forest_vs_real.png'}")


def _forest_figure(path: Path, sim: tuple, sim_label: str, real: tuple) -> None:
    """bench_forest's figure: a simulated window (freq, T, rms) above a real one, 4 rms dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 6))
    for ax, (f, T, rms), label in [
        (axes[0], sim, sim_label),
        (axes[1], real, "IRAS 16293-2422 B spw 105 (observed frame)"),
    ]:
        ax.plot(f / 1e3, T, lw=0.5, color="k")
        ax.axhline(4 * rms, color="r", lw=0.5, ls="--")
        ax.set_title(f"{label}: rms {rms:.2f} K, dashed 4 rms", fontsize=9)
        ax.set_ylabel("T [K]")
    axes[1].set_xlabel("frequency [GHz]")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def bench_limits(n_cases: int = 100, seed: int = 11) -> None:
    """Upper limits on N_tot (issue 15): CH3OH in the two windows of the tests with everything
    but N_tot fixed (eta 0.9, T_ex 10 K, FWHM 0.5 km/s, v_off 0; thin lines), noise 0.1 K and
    0.2 K, truths at 0, 1 and 2 sigma_N (sigma_N of the linear model, sum (dT/dN / rms)^2 =
    1 / sigma_N^2). Per truth: the fraction detected, the fraction of limits at or above the
    truth (coverage of the 3-sigma one-sided limit), the median limit in sigma_N, and the
    median ratio of the limits at 0.2 K and 0.1 K on the same noise draw (scaled). Last, noise
    only with every parameter free in the default box: how often the fitted shape makes a
    chance detection, and the distribution of Delta chi2."""
    import spectuner

    mol = lte.load_molecule("CH3OH", freq_range_MHz=(96000, 242000))
    grids = [np.arange(*g) for g in CLEAN_GRIDS_MHZ]
    shape, wide = dict(eta=0.9, T_ex=10.0, delta_v=0.5, v_off=0.0), {"N_tot": (1e9, 1e20)}
    unit = [lte.spectrum(f, mol, np.array([[0.9, 10.0, 1e12, 0.5, 0.0]]))[0] / 1e12 for f in grids]
    rng = np.random.default_rng(seed)
    for rms in (0.1, 0.2):
        sigma_N = 1 / np.sqrt(sum(np.sum((u / rms) ** 2) for u in unit))
        for z in (0.0, 1.0, 2.0):
            rows = []
            for _ in range(n_cases):
                noise = [rng.normal(0, 1, f.size) for f in grids]
                limit = []
                for scale in (1.0, 2.0):
                    T = [z * sigma_N * u + scale * rms * n for u, n in zip(unit, noise)]
                    windows = [spectuner.Window(f, t, scale * rms) for f, t in zip(grids, T)]
                    res = spectuner.fit_spectrum(windows, [mol], "random+slsqp", "chi2", 10,
                                                 bounds=wide, fix=shape)  # fmt: skip
                    limit.append(res["detection"]["CH3OH"])
                rows.append((limit[0]["detected"], limit[0]["N_tot_upper"] >= z * sigma_N,
                             limit[0]["N_tot_upper"] / sigma_N,
                             limit[1]["N_tot_upper"] / limit[0]["N_tot_upper"]))  # fmt: skip
            a = np.array(rows, dtype=float)
            print(f"rms_K={rms} truth_sigma={z:g} sigma_N={sigma_N:.3g} cases={n_cases} "
                  f"detected={a[:, 0].mean():.3f} covered={a[:, 1].mean():.3f} "
                  f"median_limit_sigma={np.median(a[:, 2]):.2f} "
                  f"median_ratio_2rms={np.median(a[:, 3]):.3f}", flush=True)  # fmt: skip
    dchi2 = []  # noise only, every parameter free in the default box: chance detections
    for case in range(n_cases // 2):
        windows = [spectuner.Window(f, rng.normal(0, 0.1, f.size), 0.1) for f in grids]
        res = spectuner.fit_spectrum(windows, [mol], "random+slsqp", "chi2", seed=case)
        dchi2.append(res["detection"]["CH3OH"]["dchi2"])
    print(f"free_shape noise_only cases={len(dchi2)} "
          f"detected={np.mean(np.array(dchi2) >= spectuner.DETECT_DCHI2):.3f} "
          f"dchi2_median={np.median(dchi2):.3g} dchi2_p95={np.percentile(dchi2, 95):.3g} "
          f"dchi2_max={np.max(dchi2):.3g}", flush=True)  # fmt: skip


def coverage_cases(kind: str, n_cases: int, seed: int):
    """The spectra of bench_coverage, one at a time: (windows, CH3OH molecule, truth (5,) in
    PARAM_NAMES order, extra fit_spectrum keywords). kind "clean": CH3OH alone in the two
    windows of the tests, truths uniform in the central 80 % of the unit cube of docs/method.md
    §3, peak S/N log-uniform in 20-200. kind "forest": one Band 6 window of forest.py's
    hot_corino preset with CH3OH the target among 20-60 molecules (at most those that resolve
    in ../shared/data/catalogs; forest.draw_forest, seed [seed, case]), truth the target's
    injected parameters, N_tot fitted in FOREST_N_TOT."""
    import spectuner

    if kind == "forest":
        import forest

        mols = forest.load_forest_molecules(SHARED / "catalogs", quiet=True)
        for case in range(n_cases):
            wins, truth = forest.draw_forest([seed, case], mols, "CH3OH", "hot_corino", 6, 1)
            yield ([spectuner.Window(*w) for w in wins], mols["CH3OH"],
                   truth["params"]["CH3OH"], dict(bounds={"N_tot": FOREST_N_TOT}))  # fmt: skip
        return
    if kind != "clean":
        raise ValueError(f"coverage kind {kind!r}: expected 'clean' or 'forest'")
    mol = lte.load_molecule("CH3OH", freq_range_MHz=(96000, 242000))
    grids = [np.arange(*g) for g in CLEAN_GRIDS_MHZ]
    box = spectuner.make_box(["CH3OH"], None, None)
    rng = np.random.default_rng(seed)
    for _ in range(n_cases):
        truth, _, _, windows = clean_case(rng, mol, grids, box)
        yield windows, mol, truth, {}


def _coverage_row(res: dict, truth: np.ndarray, names) -> tuple:
    """(z (5,) = (value - truth) / error, deviation (5,): relative, km/s for v_off, flags:
    at_bound_each (5,) bool and the per-fit flags of bench_coverage)."""
    est = np.array([res["params"]["CH3OH"][p] for p in names])
    err = np.array([res["errors"]["CH3OH"][p] for p in names])
    polish, notes = res["chi2_refine"] or dict(n_chan=1, n_dropped=0), res["error_notes"]["CH3OH"]
    flags = dict(
        at_bound_each=np.isin(names, list(res["at_bound"]["CH3OH"])),
        polish_skipped="kept_pm" in polish,
        at_bound=bool(res["at_bound"]["CH3OH"]),
        nearly_thin="nearly thin" in notes.get("N_tot", ""),
        dropped=polish["n_dropped"] / (polish["n_chan"] + polish["n_dropped"]),
    )
    return (est - truth) / err, np.where(np.arange(5) == 4, est - truth, est / truth - 1), flags


def bench_coverage(n_cases: int = 100, seed: int = 13, kind: str = "clean") -> None:
    """Coverage of the 1-sigma errors (issue 14) on the spectra of coverage_cases (kind "clean"
    or "forest"): random+slsqp with 50 starts and the pm loss without and with the final chi2
    refinement (fit_spectrum's chi2_refine, the default), and the chi2 loss. Per run and
    parameter: the fits with a finite error (`finite`), the fractions of those with |value -
    truth| <= 1 and <= 3 errors (Gaussian errors: 0.683 and 0.997) and the median of
    |value - truth| / error (0.674), the fits at a face of the box (no error), and the median
    error in value (relative for eta, T_ex, N_tot and delta_v, in km/s for v_off). Per run, the fits
    flagged (any of): chi2 refinement not applied (`polish_skipped`: over spectuner.FOREST_DROP
    of the channels unexplained, the pm values kept and their errors a lower bound), a
    parameter at a face of the box (`at_bound`, its error NaN), the nearly-thin-lines warning
    on eta and N_tot (`nearly_thin`); and the fits refined with channels left out as unexplained
    (`dropped`) with the median fraction of channels left out (`median_dropped_frac`)."""
    import spectuner

    names = spectuner.PARAM_NAMES
    runs = {"pm": dict(loss="pm", chi2_refine=False), "pm+chi2": dict(loss="pm"),
            "chi2": dict(loss="chi2")}  # fmt: skip
    rows = {k: [] for k in runs}
    for case, (windows, mol, truth, extra) in enumerate(coverage_cases(kind, n_cases, seed)):
        for key, kw in runs.items():
            res = spectuner.fit_spectrum(windows, [mol], "random+slsqp", seed=case, **extra, **kw)
            rows[key].append(_coverage_row(res, truth, names))
    for key in runs:
        Z, D = np.array([r[0] for r in rows[key]]), np.abs(np.array([r[1] for r in rows[key]]))
        F = {f: np.array([r[2][f] for r in rows[key]]) for f in rows[key][0][2]}
        for j, p in enumerate(names):
            ok = np.isfinite(Z[:, j])
            print(f"kind={kind} run={key} param={p} cases={n_cases} finite={ok.sum()} "
                  f"within_1sigma={np.mean(np.abs(Z[ok, j]) <= 1):.2f} "
                  f"within_3sigma={np.mean(np.abs(Z[ok, j]) <= 3):.2f} "
                  f"median_abs_z={np.median(np.abs(Z[ok, j])):.2f} "
                  f"at_bound={F['at_bound_each'][:, j].sum()} "
                  f"median_abs_error={np.median(D[:, j]):.3g}", flush=True)  # fmt: skip
        print(f"kind={kind} run={key} cases={n_cases} flagged="
              f"{np.sum(F['polish_skipped'] | F['at_bound'] | F['nearly_thin'])} "
              + " ".join(f"{f}={F[f].sum()}" for f in ("polish_skipped", "at_bound", "nearly_thin"))
              + f" dropped={np.sum(F['dropped'] > 0)} median_dropped_frac="
              f"{np.median(F['dropped']):.3g}", flush=True)  # fmt: skip
