"""The outputs of a fit: model spectra per window, the printed report, the JSON, the figure.

model_windows gives the summed LTE model (docs/method.md §2) of each window at fitted or given
parameters, in each file's channel order; it makes spectuner.py's `model` spectra and plots, and
fit_cube.py's model cube. result_lines and result_json turn a fit_spectrum result into the
report and JSON of `spectuner.py fit`, and plot_fit draws data, model and residual.

    import report
    models = report.model_windows(windows, [mol], {"CH3OH": dict(eta=0.5, T_ex=150, ...)})
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import lte
from problem import PARAM_NAMES, Problem, Window, make_box
from uncertainty import limit_text


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


def write_spectra(path: str, windows: list[Window], models: list[np.ndarray],
                  rms_K: list[float], seed: int = 0) -> None:  # fmt: skip
    """Write each window's model (plus Gaussian noise of rms_K[i], the last for the rest; none
    if empty) as two columns (freq MHz, T K) to path, with an _i suffix for several windows."""
    rng = np.random.default_rng(seed)
    for i, (w, T) in enumerate(zip(windows, models)):
        noise = rng.normal(0.0, rms_K[min(i, len(rms_K) - 1)], T.size) if rms_K else 0
        out = Path(path)
        out = out if len(windows) == 1 else out.with_stem(f"{out.stem}_{i}")
        np.savetxt(out, np.column_stack([w.freq_MHz, T + noise]), fmt="%.9e")
        print(f"wrote={out} n_chan={T.size} peak_K={T.max():.4g}")


def result_lines(res: dict) -> list[str]:
    """The printed report of a fit_spectrum result: value +- error and note per parameter, the
    run's key=value line, the chi2 polish, detections and limits, parameters at a face."""
    out = []
    for name in res["params"]:
        for p in PARAM_NAMES:
            note = res["error_notes"][name].get(p, "")
            out.append(f"{name:>10s} {p:>8s} = {res['params'][name][p]:11.4g} +- "
                       f"{res['errors'][name][p]:9.3g}  {note}")  # fmt: skip
    run = " ".join(
        f"{k}={res[k]:.6g}" if isinstance(res[k], float) else f"{k}={res[k]}"
        for k in ("loss", "nfev", "time_s", "method", "loss_name", "status")
    )
    out.append(run + " " + " ".join(f"tau_max[{m}]={t:.3g}" for m, t in res["tau_max"].items()))
    if res["chi2_refine"]:  # issue 14: the pm optimum refined by least squares
        c = res["chi2_refine"]
        out.append(f"chi2_refine: chi2 {c['chi2_pm']:.6g} -> {c['chi2']:.6g} on {c['n_chan']} "
                   f"channels ({c['n_dropped']} unexplained left out) "
                   f"nfev={c['nfev']}")  # fmt: skip
        if "kept_pm" in c:
            out.append(f"chi2_refine not applied: {c['kept_pm']}")
        if "lower_bound" in c:
            out.append(f"errors: {c['lower_bound']}")
    for name, det in res["detection"].items():  # issue 15: detections and upper limits
        out.append(limit_text(name, det))
    for name, flags in res["at_bound"].items():
        for p, side in flags.items():
            out.append(f"at_bound[{name}:{p}]={side}: {res['error_notes'][name][p]}")
    return out


def result_json(res: dict, config: dict) -> dict:
    """A fit_spectrum result as written by --json: per molecule the values and NAME_err (NaN
    as null), the run's fields, detections, and the config."""
    nan_to_none = lambda v: None if np.isnan(v) else v  # noqa: E731
    mols = {
        m: {
            **res["params"][m],
            **{f"{p}_err": nan_to_none(e) for p, e in res["errors"][m].items()},
        }
        for m in res["params"]
    }
    return dict(
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
        config=config,
    )


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
