"""Fit one spectrum with the LTE model: parameter box, losses, optimisers, errors, command line.

Implements METHOD.md §3 (unit cube over the parameter box), §4 (chi2 and peak-matching losses),
§7 (best of N_init starts refined by SLSQP or Nelder-Mead; particle swarm, optionally polished
by the same local optimisers, ours) and the 1-sigma errors of issue 3, for Qiu et al.,
arXiv:2511.21027 (Spectuner-D1) and Spectuner (ApJS 277, 21).

    python spectuner.py fit ../shared/data/spectra/iras16293b/*.dat --mol CH3OH --v_lsr 2.7 \
        --beam_arcsec 0.486 --T_bg_K 5 --loss pm --json fit.json --plot fit.png
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
from functools import lru_cache, partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.signal import find_peaks, peak_widths

import lte
from optimise import (
    bound_flags,
    gauss_newton_errors,
    profile_crossing,
    pso,
    random_starts,
    refine_least_squares,
    refine_nelder_mead,
    refine_slsqp,
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
    method: str = "auto"  # auto (nn+slsqp if a policy exists), nn, nn+slsqp, nn+nelder-mead,
    # random+slsqp, random+nelder-mead, pso, pso+slsqp, pso+nelder-mead
    policy: str = ""  # policy file for the nn methods; "" = data/policy.pt
    loss: str = "pm"  # pm (peak matching) or chi2
    n_init: int = 50  # random starts (policy samples for nn methods)
    pso_restarts: int = 1  # independent particle-swarm runs, best kept
    seed: int = 0  # seeds every random draw
    json: str = ""  # write the result here (JSON); "" = do not
    plot: str = ""  # draw data, model and residual per window here (PNG); "" = do not
    freq_MHz: str = ""  # model: LO:HI:N channel grid, used when no SPEC file is given
    out: str = "model.txt"  # model: output spectrum (freq MHz, T K); _i suffix for several grids


PARAM_NAMES = ("eta", "T_ex", "N_tot", "delta_v", "v_off")
IS_LOG = np.array([True, True, True, True, False])  # §3: the box is linear in log10 of these
ETA_MAX = 1.0 - 1e-6  # eta = 1 would be an infinite source (§3: capped just below 1)
DEFAULT_BOUNDS = {
    "eta": (1e-3, ETA_MAX),
    "T_ex": (3.0, 1000.0),
    "N_tot": (1e12, 1e20),
    "delta_v": (0.3, 30.0),
    "v_off": (-12.0, 12.0),
}
PEAK_SIGMA = 4.0  # §4: peaks need height and prominence >= 4 rms
NEARLY_THIN_TAU = 0.2  # below this peak opacity the eta and N_tot errors get a warning (README)
AT_BOUND_TOL = 1e-3  # a free parameter this close (unit cube) to a face of the box is at it
DETECT_DCHI2 = 25.0  # detected: chi2(no molecule) - min chi2 along N_tot >= this (README)
LIMIT_SIGMA = 3.0  # upper limit: N_tot where chi2 is LIMIT_SIGMA^2 above its minimum (README)
LIMIT_SCAN_DEX = (-6.0, 2.0)  # dex added below and above the box's N_tot range for the profile


class Window(NamedTuple):
    """One observed window; freq_MHz in the observed (LSRK) frame as in the file."""

    freq_MHz: np.ndarray
    T_obs_K: np.ndarray
    rms_K: float | np.ndarray
    T_bg_K: float = 0.0
    beam_arcsec: float | None = None


# --- parameter box (§3) ---


def make_box(mol_names: list[str], bounds: dict | None = None, fix: dict | None = None) -> dict:
    """Box of the 5 k parameters of k molecules in internal coordinates q (log10 where IS_LOG).

    Args:
        mol_names: molecule names, in parameter order.
        bounds: {NAME or "MOL:NAME": (lo, hi)} in physical units, overriding DEFAULT_BOUNDS.
        fix: {NAME or "MOL:NAME": value} in physical units; these are not optimised.

    Returns:
        dict with q_lo, q_hi (5 k,), x_fix (5 k,) physical (NaN where free), free and log (5 k,)
        bool, names (5 k,) "MOL:NAME".

    Raises:
        ValueError: unknown molecule or parameter name, lo >= hi, or a non-positive log parameter.
    """
    n = 5 * len(mol_names)
    lo, hi = np.tile([[DEFAULT_BOUNDS[p][i] for p in PARAM_NAMES] for i in (0, 1)], len(mol_names))
    value = np.full(n, np.nan)
    for table, is_range in ((bounds or {}, True), (fix or {}, False)):
        for key, val in table.items():
            for i in _param_indices(key, mol_names):
                lo_i, hi_i = val if is_range else (val, val)
                if is_range and not lo_i < hi_i:
                    raise ValueError(f"bounds for {key}: low {lo_i} must be below high {hi_i}")
                if IS_LOG[i % 5] and lo_i <= 0:
                    raise ValueError(f"{key}={lo_i}: {PARAM_NAMES[i % 5]} must be positive")
                lo[i], hi[i] = (lo_i, hi_i) if is_range else (lo[i], hi[i])
                value[i] = np.nan if is_range else val
    log = np.tile(IS_LOG, len(mol_names))
    q_lo, q_hi = (np.where(log, np.log10(np.where(log, a, 1.0)), a) for a in (lo, hi))
    names = [f"{m}:{p}" for m in mol_names for p in PARAM_NAMES]
    return dict(q_lo=q_lo, q_hi=q_hi, x_fix=value, free=np.isnan(value), log=log, names=names)


def _param_indices(key: str, mol_names: list[str]) -> list[int]:
    """Indices into the 5 k vector for "NAME" (every molecule) or "MOL:NAME"."""
    mol, _, name = key.rpartition(":")
    if name not in PARAM_NAMES:
        raise ValueError(
            f"unknown parameter {key!r}; expected [MOL:]NAME with NAME in {PARAM_NAMES}"
        )
    if mol and mol not in mol_names:
        raise ValueError(f"unknown molecule {mol!r} in {key!r}; fitted molecules: {mol_names}")
    return [5 * k + PARAM_NAMES.index(name) for k, m in enumerate(mol_names) if mol in ("", m)]


def to_physical(U: np.ndarray, box: dict) -> np.ndarray:
    """Free unit-cube coordinates U (B, n_free) -> physical parameters (B, 5 k)."""
    U = np.clip(np.atleast_2d(U), 0.0, 1.0)
    free, log = box["free"], box["log"][box["free"]]
    X = np.tile(box["x_fix"], (U.shape[0], 1))  # fixed values exactly as given
    q = box["q_lo"][free] + U * (box["q_hi"][free] - box["q_lo"][free])
    X[:, free] = np.where(log, 10.0**q, q)
    return X


def to_unit(X: np.ndarray, box: dict) -> np.ndarray:
    """Physical parameters X (B, 5 k) -> free unit-cube coordinates (B, n_free), the inverse."""
    X = np.atleast_2d(X)
    q = np.where(box["log"], np.log10(np.where(box["log"], X, 1.0)), X)[:, box["free"]]
    lo, hi = box["q_lo"][box["free"]], box["q_hi"][box["free"]]
    return (q - lo) / (hi - lo)


# --- losses (§4), batched: T_model (B, C) against one observed window (C,) ---


def loss_chi2(T_model: np.ndarray, T_obs: np.ndarray, rms_K, obs=None) -> np.ndarray:
    """0.5 mean(((T_obs - T_model) / rms)^2) over channels, (B, C) -> (B,); obs is unused."""
    return 0.5 * np.mean(((T_obs - np.atleast_2d(T_model)) / rms_K) ** 2, axis=-1)


def find_spans(T_K: np.ndarray, rms_K) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Peaks with height and prominence >= 4 rms and their merged spans (§4).

    A peak's span is its width at 25 % of its prominence below the top (peak_widths
    rel_height=0.25); overlapping (or touching) spans are merged.

    Returns:
        spans (n, 2) fractional channel edges, tops (n,) channel of each span's highest peak,
        peaks (m,) channels of all peaks.
    """
    rms = np.broadcast_to(rms_K, T_K.shape)
    peaks, _ = find_peaks(T_K, height=PEAK_SIGMA * rms, prominence=PEAK_SIGMA * np.median(rms))
    if peaks.size == 0:
        return np.empty((0, 2)), np.empty(0, dtype=int), peaks
    left, right = peak_widths(T_K, peaks, rel_height=0.25)[2:]
    order = np.argsort(left, kind="stable")
    left, right, pk = left[order], right[order], peaks[order]
    reach = np.maximum.accumulate(right)
    group = np.concatenate(([0], np.cumsum(left[1:] > reach[:-1])))  # a new span starts here
    starts = np.flatnonzero(np.diff(group, prepend=-1))
    spans = np.c_[left[starts], np.maximum.reduceat(right, starts)]
    best = np.lexsort((np.arange(pk.size), -T_K[pk], group))  # per span: highest, then first
    tops = pk[best[np.searchsorted(group[best], np.arange(starts.size))]]
    return spans, tops, peaks


def _cum_trapz(Y: np.ndarray) -> np.ndarray:
    """Trapezoid integral of Y (..., C) from channel 0 to each channel, (..., C)."""
    out = np.zeros(Y.shape)
    np.cumsum(0.5 * (Y[..., 1:] + Y[..., :-1]), axis=-1, out=out[..., 1:])
    return out


def _span_means(y: np.ndarray, cum: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Means of the linear interpolant of y (channels 0..C-1) over spans [a, b] (fractional).

    The exact integral of the interpolant (= the trapezoid rule on its breakpoints) divided by
    the width; cum = _cum_trapz(y) makes each span O(1).
    """

    def integral(x):
        i = np.clip(np.floor(x).astype(int), 0, y.size - 2)
        t = x - i
        return cum[i] + t * y[i] + 0.5 * t * t * (y[i + 1] - y[i])

    width = b - a
    inside = width > 0
    return np.where(
        inside,
        (integral(b) - integral(a)) / np.where(inside, width, 1.0),
        np.interp(a, np.arange(y.size), y),
    )


def fp_weight(x: float, peaks_obs: np.ndarray, n_chan: int) -> float:
    """False-positive weight at channel x: 0 at an observed peak, 1 half-way to the next (§4).

    Beyond the outermost peaks the half-gap on their inner side is used, and half the window
    when there is one observed peak (ours); with none the weight is 1.
    """
    p = np.sort(peaks_obs).astype(float)
    if p.size == 0:
        return 1.0
    half = np.diff(p) / 2 if p.size > 1 else np.array([n_chan / 2])
    j = np.searchsorted(p, x)
    if 0 < j < p.size:
        return min(1.0, min(x - p[j - 1], p[j] - x) / half[j - 1])
    return min(1.0, abs(x - p[min(j, p.size - 1)]) / half[0 if j == 0 else -1])


def loss_pm(T_model: np.ndarray, T_obs: np.ndarray, rms_K, obs=None) -> np.ndarray:
    """Peak-matching loss of Spectuner (§4), (B, C) -> (B,); lower is better, < 0 when matched.

    Args:
        T_model: model spectra (B, C) or (C,), K.
        T_obs: observed spectrum (C,), K.
        rms_K: noise, scalar or (C,), K.
        obs: find_spans(T_obs, rms_K), computed once per window by the caller; None = here.

    Returns:
        (B,) mean |T_obs - T_model| + true-positive terms + weighted false-positive terms.
    """
    T_model = np.atleast_2d(T_model)
    spans_o, _, peaks_o = find_spans(T_obs, rms_K) if obs is None else obs
    floor = PEAK_SIGMA * np.broadcast_to(rms_K, T_obs.shape)  # P = 4 rms
    resid = np.abs(T_obs - T_model)  # (B, C)
    out = np.mean(resid, axis=-1)
    cum_obs = _cum_trapz(T_obs)
    width_o = spans_o[:, 1] - spans_o[:, 0]
    for b, T_m in enumerate(T_model):
        spans_m, tops_m, _ = find_spans(T_m, rms_K)
        if spans_m.size == 0:
            continue
        lo = np.maximum(spans_o[None, :, 0], spans_m[:, None, 0])  # (n_m, n_o) overlaps I
        hi = np.minimum(spans_o[None, :, 1], spans_m[:, None, 1])
        im, io = np.nonzero(hi > lo)
        if im.size:  # true positives: every overlap of an observed and a model span
            a, c = lo[im, io], hi[im, io]
            obs_I = _span_means(T_obs, cum_obs, a, c)
            mod_I = _span_means(T_m, _cum_trapz(T_m), a, c)
            res_I = _span_means(resid[b], _cum_trapz(resid[b]), a, c)
            dice = 2 * (c - a) / (width_o[io] + spans_m[im, 1] - spans_m[im, 0])
            term = res_I - dice * obs_I
            out[b] += np.where(mod_I < obs_I, np.minimum(term, 0.0), term).sum()  # blends
        lonely = np.flatnonzero(~(hi > lo).any(axis=1))
        if lonely.size:  # false positives: model peaks where nothing was observed
            a, c = spans_m[lonely, 0], spans_m[lonely, 1]
            over_obs, over_floor = np.maximum(0, T_m - T_obs), np.maximum(0, T_m - floor)
            excess = np.minimum(
                _span_means(over_obs, _cum_trapz(over_obs), a, c),
                _span_means(over_floor, _cum_trapz(over_floor), a, c),
            )
            weight = [fp_weight(t, peaks_o, T_obs.size) for t in tops_m[lonely]]
            out[b] += np.dot(weight, excess)
    return out


LOSSES = {"chi2": loss_chi2, "pm": loss_pm}


# --- methods (§7): a start (random, swarm or network) and a local refinement ---


def _then_local(f, u, loss, nfev, status, local):
    """The start (u, loss) after nfev runs, refined by `local` if given, its runs added."""
    if local is None:
        return u, loss, nfev, status
    u, loss, nfev_local, status = local(f, u, loss)
    return u, loss, nfev + nfev_local, status


def run_random_local(f, n_dim, n_init, rng, n_restarts=1, local=refine_slsqp):
    """Best of n_init uniform starts refined by a local optimiser (§7 baseline)."""
    u0, f0, nfev0 = random_starts(f, n_dim, n_init, rng)
    return _then_local(f, u0, f0, nfev0, "ok", local)


def run_pso(f, n_dim, n_init, rng, n_restarts=1, local=None):
    """Best of n_restarts independent particle swarms (§7; n_init is unused), then, if `local`
    is given (ours: pso+slsqp), a local polish from the swarm's best.

    The swarm's stopping rule (15 cycles under 1e-5 relative gain) often fires while the best
    particle still lies on the floor of a long valley (eta-N_tot-T_ex of thin or broad lines),
    a few sigma from the minimum; a polish of tens to a few hundred runs takes it to the bottom.
    """
    runs = [pso(f, n_dim, rng) for _ in range(n_restarts)]
    u, loss, _, status = min(runs, key=lambda r: r[1])
    return _then_local(f, u, loss, sum(r[2] for r in runs), status, local)


def run_policy(f, n_dim, n_init, rng, n_restarts=1, local=None, propose=None):
    """Best of n_init policy samples, refined by `local` if given (§7: nn, nn+slsqp, ...).

    propose(n) -> (n, n_dim) unit-cube starts from the network (see policy_sampler).
    """
    U = propose(n_init)
    L = f(U)
    i = int(np.argmin(L))
    return _then_local(f, U[i], float(L[i]), n_init, "ok", local)


METHODS = {
    "random+slsqp": run_random_local,
    "random+nelder-mead": partial(run_random_local, local=refine_nelder_mead),
    "pso": run_pso,
    "pso+slsqp": partial(run_pso, local=refine_slsqp),
    "pso+nelder-mead": partial(run_pso, local=refine_nelder_mead),
    "nn": run_policy,
    "nn+slsqp": partial(run_policy, local=refine_slsqp),
    "nn+nelder-mead": partial(run_policy, local=refine_nelder_mead),
}
DEFAULT_POLICY = Path(__file__).resolve().parent / "data" / "policy.pt"


# --- the policy network's proposals (§5, §7) ---


@lru_cache(maxsize=4)
def load_policy(path: str):
    """(net, model config) from a policy file written by train.py, on the CPU, cached by path.

    Raises:
        FileNotFoundError: no such file. ValueError: torch is not installed.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"policy file {path} not found (train one with train.py)")
    try:
        import model
    except ImportError as err:
        raise ValueError(f"the nn methods need torch ({err}); use random+slsqp") from None
    return model.load_policy(path, device="cpu")


def resolve_method(method: str, policy) -> tuple[str, str]:
    """'auto' -> nn+slsqp when a policy is available, else random+slsqp; with the reason."""
    if method != "auto":
        return method, ""
    path = policy or DEFAULT_POLICY
    if not isinstance(path, (str, Path)) or Path(path).is_file():
        try:
            import torch  # noqa: F401

            return "nn+slsqp", ""
        except ImportError:
            return "random+slsqp", "torch is not installed: random+slsqp instead of nn+slsqp"
    return "random+slsqp", f"no policy at {path}: random+slsqp instead of nn+slsqp"


def line_table(mol, mcfg) -> dict:
    """The arrays model.make_tokens reads for a molecule, with log10 Q at the model's
    temperatures; train.py builds its tokens with it too, so training and fitting agree."""
    table = {k: getattr(mol, k) for k in ("freq_MHz", "A_s", "g_u", "E_low_K", "E_up_K")}
    table["log10_Q"] = np.log10(mol.Q(np.asarray(mcfg.Q_temps_K, dtype=float)))
    return table


def _policy_tokens(mcfg, prep: list, molecules: list, box: dict):
    """Each molecule's tokens for one spectrum, or (None, reason) when the spectrum is outside
    what the network was trained on (a box beyond the training box, no transition in reach)."""
    import model

    train_box = make_box([m.name for m in molecules])
    if np.any(box["q_lo"] < train_box["q_lo"] - 1e-9) or np.any(
        box["q_hi"] > train_box["q_hi"] + 1e-9
    ):
        return None, "bounds reach beyond the box the network was trained on"
    wins = [dict(freq_MHz=w["freq"], T_K=w["T"], rms_K=w["rms"], T_bg_K=w["T_bg"],
                 beam_arcsec=w["beam"]) for w in prep]  # fmt: skip
    tokens = []
    for mol in molecules:
        tokens.append(model.make_tokens(wins, line_table(mol, mcfg), mcfg))
        if tokens[-1]["spec"].shape[0] == 0:
            return None, f"{mol.name} has no transition in reach of the windows"
    return tokens, ""


def _policy_draw(net, token_sets: list, n: int, seeds: list, names: list, box: dict) -> np.ndarray:
    """n network samples for each of S spectra, the i-th samples of the molecules combined and
    mapped through the training box to `box`: (n, S, n_free). The encoder runs once over all
    spectra (batched); each spectrum's samples come from its own seed, so they do not depend on
    which other spectra share the batch. Samples that fall outside a `box` narrower than the
    training box are replaced by uniform draws inside it (clipping would pile them on its faces).
    """
    import torch

    import model

    k = len(names)
    batch = model.collate([t for tokens in token_sets for t in tokens])  # S * k states
    with torch.no_grad():
        context = net(batch)  # (S k, D)
        u = [net.flow.sample(context[i * k : (i + 1) * k], n,
                             torch.Generator().manual_seed(int(seed)))[0]
             for i, seed in enumerate(seeds)]  # fmt: skip
    u = torch.stack(u, 1).double().numpy().reshape(n * len(token_sets), 5 * k)  # (n S, 5 k)
    U = to_unit(to_physical(u, make_box(names)), box).reshape(n, len(token_sets), -1)
    for i, seed in enumerate(seeds):  # samples outside a narrower user box: uniform in it (ours)
        out = np.any((U[:, i] < 0) | (U[:, i] > 1), axis=1)
        U[out, i] = np.random.default_rng(int(seed)).random((n, U.shape[2]))[out]
    return U


def policy_sampler(policy, prep: list, molecules: list, box: dict, seed: int):
    """propose(n) -> (n, n_free) unit-cube starts from the network for one spectrum.

    Returns:
        (propose, reason): propose is None with the reason when the spectrum is outside what
        the network was trained on.
    """
    net, mcfg = load_policy(str(policy)) if isinstance(policy, (str, Path)) else policy
    tokens, reason = _policy_tokens(mcfg, prep, molecules, box)
    if tokens is None:
        return None, reason
    names = [m.name for m in molecules]
    return (lambda n: _policy_draw(net, [tokens], n, [seed], names, box)[:, 0]), ""


def policy_starts(spectra: list, molecules: list, n: int, seeds, policy=None,
                  bounds=None, fix=None, v_lsr_kms: float = 0.0) -> list:  # fmt: skip
    """Network starts for many spectra (e.g. cube pixels) in one batched call of the network.

    Args:
        spectra: list of window lists (each as for fit_spectrum). n: samples per spectrum.
        seeds: one seed per spectrum (as fit_spectrum's seed: the same starts as it would draw).
        policy, bounds, fix, v_lsr_kms: as for fit_spectrum.
    Returns:
        per spectrum, an (n, n_free) array of unit-cube starts for fit_spectrum(starts=...), or a
        string saying why the network cannot propose (fit_spectrum then uses random starts).
    """
    net, mcfg = (
        load_policy(str(policy or DEFAULT_POLICY)) if not isinstance(policy, tuple) else policy
    )
    names = [m.name for m in molecules]
    box = make_box(names, bounds, fix)
    out, token_sets, where = [], [], []
    seeds = np.broadcast_to(seeds, len(spectra))
    for windows in spectra:
        try:
            tokens, reason = _policy_tokens(
                mcfg, _prepare(windows, molecules, _margin_kms(box), v_lsr_kms), molecules, box
            )
        except ValueError as err:
            tokens, reason = None, str(err)
        out.append(reason)
        if tokens is not None:
            token_sets.append(tokens)
            where.append(len(out) - 1)
    if token_sets:
        draws = _policy_draw(net, token_sets, n, [seeds[i] for i in where], names, box)
        for j, i in enumerate(where):
            out[i] = draws[:, j]
    return out


def _margin_kms(box: dict) -> float:
    """How far (km/s) beyond a window a line can still reach it within the box."""
    q_v = np.concatenate([box[k][4::5] for k in ("q_lo", "q_hi", "x_fix")])
    return float(np.nanmax(np.abs(q_v)) + 3 * 10 ** box["q_hi"][3::5].max())


# --- the model over windows and the fit ---


def _prepare(windows: list[Window], molecules: list, margin_kms: float, v_lsr_kms: float) -> list:
    """Rest-frame windows with each molecule's lines within margin_kms of them."""
    if not windows:
        raise ValueError("no spectral window given")
    prep = []
    for w in windows:
        freq = np.asarray(w.freq_MHz, dtype=float) * (1.0 + v_lsr_kms / lte.C_KMS)
        lo, hi = (
            freq.min() * (1 - margin_kms / lte.C_KMS),
            freq.max() * (1 + margin_kms / lte.C_KMS),
        )
        T = np.asarray(w.T_obs_K, dtype=float)
        rms = np.broadcast_to(np.asarray(w.rms_K, dtype=float), T.shape)
        mols = [lte.select_lines(m, lo, hi) for m in molecules]
        prep.append(dict(freq=freq, T=T, rms=rms, T_bg=w.T_bg_K, mols=mols, nu_c=freq.mean(),
                         beam=w.beam_arcsec))  # fmt: skip
    for k, m in enumerate(molecules):
        if all(p["mols"][k].freq_MHz.size == 0 for p in prep):
            ranges = ", ".join(f"{p['freq'].min():.1f}-{p['freq'].max():.1f}" for p in prep)
            raise ValueError(
                f"molecule {m.name} has no line within {margin_kms:.0f} km/s of the "
                f"windows (rest frame, MHz): {ranges}"
            )
    return prep


def _forward(X: np.ndarray, prep: list, nu_ref_MHz: float | None = None) -> list[np.ndarray]:
    """Summed model of all molecules per window, X (B, 5 k) -> list of (B, C) (§2)."""
    out = []
    for w in prep:
        T = np.zeros((X.shape[0], w["freq"].size))
        for k, mol in enumerate(w["mols"]):
            if mol.freq_MHz.size == 0:
                continue
            p = X[:, 5 * k : 5 * k + 5].copy()
            if nu_ref_MHz is not None:  # single dish: eta fitted at nu_ref, theta_beam ~ 1 / nu
                p[:, 0] = p[:, 0] / (p[:, 0] + (1 - p[:, 0]) * (nu_ref_MHz / w["nu_c"]) ** 2)
            T += lte.spectrum(w["freq"], mol, p, T_bg_K=w["T_bg"])
        out.append(T)
    return out


def _ref_freq(prep: list) -> float:
    """Centre of the data (rest frame, MHz): where a single dish's eta is fitted."""
    return 0.5 * (min(w["freq"].min() for w in prep) + max(w["freq"].max() for w in prep))


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
            belong to one minimum (issue 14). loss and nfev stay the optimiser's (METHOD §8).

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
    method, note = resolve_method(method, policy)
    if method not in METHODS or loss not in LOSSES:
        raise ValueError(
            f"method {method!r} / loss {loss!r}: expected one of "
            f"{sorted(METHODS)} / {sorted(LOSSES)}"
        )
    names = [m.name for m in molecules]
    if not names or len(set(names)) < len(names):
        raise ValueError(f"molecules {names}: expected at least one, each once")
    box = make_box(names, bounds, fix)
    if not box["free"].any():
        raise ValueError("every parameter is fixed: nothing to fit (use the model command)")
    prep = _prepare(windows, molecules, _margin_kms(box), v_lsr_kms)
    nu_ref = _ref_freq(prep) if dish_m else None
    obs = [find_spans(w["T"], w["rms"]) for w in prep]  # observed peaks once (§4)

    def objective(U):
        models = _forward(to_physical(U, box), prep, nu_ref)
        return sum(LOSSES[loss](m, w["T"], w["rms"], o) for m, w, o in zip(models, prep, obs))

    def resid(U):
        models = _forward(to_physical(U, box), prep, nu_ref)
        return np.concatenate([(w["T"] - m) / w["rms"] for m, w in zip(models, prep)], axis=1)

    rng = np.random.default_rng(seed)
    n_free = int(box["free"].sum())
    kw, fallback = {}, ""
    if method.startswith("nn"):
        if starts is None:
            propose, fallback = policy_sampler(policy or DEFAULT_POLICY, prep, molecules, box, seed)
        elif isinstance(starts, str):  # policy_starts said why the network cannot propose
            propose, fallback = None, starts
        else:
            propose = lambda n: starts[:n]  # noqa: E731  drawn elsewhere (policy_starts)
        if propose is None:  # outside what the network knows: random starts, same refinement
            method = method.replace("nn", "random") if "+" in method else "random+slsqp"
        else:
            kw["propose"] = propose
    u, best, nfev, status = METHODS[method](
        objective, n_free, n_init, rng, n_restarts=pso_restarts, **kw
    )
    polish, resid_fit = None, resid
    resid_x = partial(noise_residuals, windows, molecules, v_lsr_kms=v_lsr_kms, dish_m=dish_m)
    if loss == "pm" and chi2_refine:  # issue 14: values and errors of one chi2 minimum
        u, keep, polish = chi2_polish(resid, resid_x, u, box)
        resid_fit = lambda U: resid(U)[:, keep]  # noqa: E731
    free_names = [n for n, f in zip(box["names"], box["free"]) if f]
    sigma_u, notes_u, nfev_err = gauss_newton_errors(resid_fit, u, free_names)

    X = to_physical(u, box)[0]
    sigma = np.full(X.size, np.nan)
    sigma_q = sigma_u * (box["q_hi"] - box["q_lo"])[box["free"]]
    sigma[box["free"]] = np.where(box["log"][box["free"]], np.log(10) * X[box["free"]], 1) * sigma_q
    notes = {i: "fixed" for i in np.flatnonzero(~box["free"])}
    notes.update({np.flatnonzero(box["free"])[i]: r for i, r in notes_u.items()})
    for i, s in zip(np.flatnonzero(box["free"]), sigma_q):
        if box["log"][i] and s > 1:
            notes[i] = "unconstrained: 1-sigma beyond a factor of 10"
    at_bound, bound_text = bound_notes(u, box)  # issue 15: no symmetric error at a face
    notes.update({i: "; ".join(filter(None, (notes.get(i), t))) for i, t in bound_text.items()})
    sigma[list(notes)] = np.nan
    tau_max = {
        m.name: max(float(lte.peak_opacity(w["freq"], w["mols"][k], X[5 * k : 5 * k + 5]))
                    for w in prep)
        for k, m in enumerate(molecules)
    }  # fmt: skip
    remarks_thin = {
        5 * k + i: f"nearly thin lines (peak tau {tau_max[m]:.2g}): eta and N_tot trade off along "
        "a valley that is not quadratic, so this error may be far too small"
        for k, m in enumerate(names)
        if tau_max[m] < NEARLY_THIN_TAU and box["free"][5 * k] and box["free"][5 * k + 2]
        for i in (0, 2)
    }
    per_mol = lambda a: {m: dict(zip(PARAM_NAMES, map(float, a[5 * k : 5 * k + 5])))  # noqa: E731
                         for k, m in enumerate(names)}  # fmt: skip
    result = dict(
        params=per_mol(X),
        errors=per_mol(sigma),
        error_notes={m: {} for m in names},
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
    for i, reason in {**remarks_thin, **notes}.items():  # why NaN, else a warning
        result["error_notes"][names[i // 5]][PARAM_NAMES[i % 5]] = reason
    # --- issue 15: faces of the box, detection and upper limits on N_tot ---
    result["at_bound"] = {m: {PARAM_NAMES[i % 5]: side for i, side in at_bound.items()
                              if i // 5 == k} for k, m in enumerate(names)}  # fmt: skip
    result["chi2_refine"] = polish
    result["detection"] = {m: detect_and_limit(resid_x, X, k, box) for k, m in enumerate(names)}
    if dish_m:
        beam_ref = 1.22 * lte.C_KMS * 1e3 / (nu_ref * 1e6 * dish_m) * 206264.806  # arcsec
        eta = X[0::5]
        result["source_size_arcsec"] = dict(
            zip(names, map(float, beam_ref * np.sqrt(eta / (1 - eta))))
        )
        result["eta_ref_MHz"] = nu_ref
    return result


# --- the chi2 polish after the pm loss (issue 14) ---


def unexplained_channels(r: np.ndarray, obs_n: np.ndarray, n_sigma: float = PEAK_SIGMA):
    """Channels (M,) bool of emission the fitted model does not explain (blends to drop).

    A channel is unexplained where the data exceed the model by n_sigma rms and by more than
    the model itself (over half of the emission there is not the fit's); each such channel
    takes with it the contiguous run around it where the data exceed the model by 1 rms.

    Args:
        r: (M,) (T_obs - T_model) / rms at the fit. obs_n: (M,) T_obs / rms.
    """
    seed = (r > n_sigma) & (r > obs_n - r)
    over = r > 1.0
    run = np.cumsum(np.diff(np.concatenate([[0], over.astype(np.int8)])) == 1) * over  # run ids
    return over & np.isin(run, run[seed & over])


def chi2_polish(resid, resid_x, u: np.ndarray, box: dict, n_rounds: int = 3) -> tuple:
    """Least-squares refinement of a pm optimum u, on the channels its model explains.

    The pm loss (§4) and chi2 have different minima; the Gauss-Newton errors are the curvature
    of chi2, so they describe the chi2 minimum. This moves the pm fit there, leaving out the
    emission the model does not explain (unexplained_channels) so that a blend with another
    line does not pull the fit (ours, issue 14). The channels are chosen again at each
    refined point, up to n_rounds times, until they no longer change.

    Args:
        resid: U (B, n_free) -> (B, M) noise-normalised residuals; resid_x: the same of
            physical X (B, 5 k) (noise_residuals). u: the pm optimum (n_free,).

    Returns:
        (u, keep (M,) bool: the channels used, info dict: n_chan, n_dropped, chi2_pm and
        chi2 (over all channels, at the pm optimum and at u), nfev).
    """
    X0 = to_physical(u, box)
    X0[:, 2::5] = 0.0  # no molecule: the observed spectrum / rms
    obs_n, r = resid_x(X0)[0], resid(u[None])[0]
    chi2_pm, nfev, keep = float(r @ r), 2, None
    for _ in range(n_rounds):  # a pm fit far off leaves its own lines "unexplained" at first
        new = ~unexplained_channels(r, obs_n)
        if keep is not None and np.array_equal(new, keep):
            break
        keep = new
        u, chi2, _, n = refine_least_squares(resid, u, keep)
        r = resid(u[None])[0]
        nfev += n + 1
    info = dict(n_chan=int(keep.sum()), n_dropped=int((~keep).sum()), chi2_pm=chi2_pm,
                chi2=float(r @ r), nfev=nfev)  # fmt: skip
    return u, keep, info


# --- faces of the box and non-detections (issue 15) ---


def bound_notes(u: np.ndarray, box: dict, tol: float = AT_BOUND_TOL) -> tuple[dict, dict]:
    """Free parameters that end within tol (unit cube) of a face of the box, and what to do.

    At a face the chi2 minimum is not inside the box, so the curvature there is no 1-sigma
    error: fit_spectrum reports NaN with this note instead.

    Returns:
        flags {index into the 5 k vector: "lower" or "upper"}, notes {index: text}.
    """
    flags, notes = {}, {}
    n_mol = len(box["names"]) // 5
    for side, i in zip(bound_flags(u, tol), np.flatnonzero(box["free"])):
        if not side:
            continue
        p, key = PARAM_NAMES[i % 5], box["names"][i] if n_mol > 1 else PARAM_NAMES[i % 5]
        lo, hi = (10 ** box[k][i] if box["log"][i] else box[k][i] for k in ("q_lo", "q_hi"))
        flags[i] = str(side)
        if p == "eta" and side == "upper" and hi >= ETA_MAX:
            notes[i] = "eta at its maximum, 1 (the source fills the beam): no symmetric error"
            continue
        if box["log"][i]:  # a factor of 100 for N_tot and eta, 10 for T_ex and delta_v
            f = 100.0 if p in ("N_tot", "eta") else 10.0
            lo, hi = (lo / f, hi) if side == "lower" else (lo, hi * f)
            hi = min(hi, ETA_MAX) if p == "eta" else hi
        else:
            w = hi - lo
            lo, hi = (lo - w / 2, hi) if side == "lower" else (lo, hi + w / 2)
        at = 10 ** box["q_lo" if side == "lower" else "q_hi"][i] if box["log"][i] else (
            box["q_lo" if side == "lower" else "q_hi"][i])  # fmt: skip
        notes[i] = (f"{p} at its {side} bound {at:g}: widen it with --bounds {key}={lo:g}:{hi:g} "
                    "(no symmetric 1-sigma error at a bound)")  # fmt: skip
    return flags, notes


def noise_residuals(windows, molecules, X, v_lsr_kms: float = 0.0, dish_m=None) -> np.ndarray:
    """(T_obs - T_model) / rms over all channels of the windows at physical X (B, 5 k) -> (B, M)."""
    X = np.atleast_2d(X)
    margin_kms = np.abs(X[:, 4::5]).max() + 3 * X[:, 3::5].max()
    prep = _prepare(windows, molecules, margin_kms, v_lsr_kms)
    models = _forward(X, prep, _ref_freq(prep) if dish_m else None)
    return np.concatenate([(w["T"] - m) / w["rms"] for m, w in zip(models, prep)], axis=1)


def detect_and_limit(resid_x, X: np.ndarray, k: int, box: dict, n_sigma: float = LIMIT_SIGMA,
                     dchi2_min: float = DETECT_DCHI2, step_dex: float = 0.1) -> dict:  # fmt: skip
    """Detection test and upper limit of molecule k's N_tot along its chi2 profile.

    chi2(N) = sum_c resid_x(X with N_tot,k = N)_c^2, the other parameters held at X (fixed,
    not profiled), on a grid of step_dex in log10 N over the box's range widened by
    LIMIT_SCAN_DEX, and at N = 0 (no molecule k). The molecule is detected when
    Delta chi2 = chi2(0) - min_{N >= 0} chi2(N) >= dchi2_min (25: 5 sigma for one parameter;
    the shape parameters, fitted to the same data, make a chance Delta chi2 larger). The upper
    limit is the N above the minimum where chi2 = min + n_sigma^2: one-sided; for thin lines
    (T linear in N, chi2 = min + ((N - N_hat) / sigma_N)^2 over all real N) it is
    N_hat + n_sigma sigma_N, or N_hat + sqrt(N_hat^2 + (n_sigma sigma_N)^2) when N_hat < 0.

    Args:
        resid_x: X (B, 5 k) -> (B, M) noise-normalised residuals (noise_residuals).
        X: (5 k,) physical parameters, e.g. the fit. box: make_box's box (N_tot range).

    Returns:
        dict: dchi2, detected (bool), N_tot_upper (cm^-2; NaN when chi2 never rises by
        n_sigma^2 within the scan, e.g. saturated lines), N_tot_best (argmin, 0 if none
        better than no molecule), n_sigma, held (the other parameters {name: value}), nfev.
    """
    i = 5 * k + 2
    lo, hi = box["q_lo"][i] + LIMIT_SCAN_DEX[0], box["q_hi"][i] + LIMIT_SCAN_DEX[1]
    grid = np.arange(lo, hi + step_dex / 2, step_dex)

    def chi2(log10_N):  # (n,) -> (n,), one batched model call
        XB = np.tile(X, (np.size(log10_N), 1))
        XB[:, i] = np.where(np.isfinite(log10_N), 10.0 ** np.asarray(log10_N, float), 0.0)
        return np.sum(resid_x(XB) ** 2, axis=1)

    chi2_all = chi2(np.concatenate([[-np.inf], grid]))
    chi2_zero, chi2_grid = chi2_all[0], chi2_all[1:]
    x_up, chi2_min, nfev = profile_crossing(chi2, grid, n_sigma**2, chi2_zero, chi2_grid)
    best = float(10 ** grid[np.argmin(chi2_grid)]) if chi2_grid.min() < chi2_zero else 0.0
    held = {p: float(X[5 * k + j]) for j, p in enumerate(PARAM_NAMES) if p != "N_tot"}
    return dict(dchi2=float(chi2_zero - chi2_min), detected=bool(chi2_zero - chi2_min >= dchi2_min),
                N_tot_upper=float(10**x_up) if np.isfinite(x_up) else float("nan"),
                N_tot_best=best, n_sigma=n_sigma, held=held, nfev=nfev + grid.size + 1)  # fmt: skip


def limit_text(mol: str, det: dict) -> str:
    """One line on a molecule's detection, and its N_tot upper limit when not detected."""
    if det["detected"]:
        return f"detection[{mol}]: detected (dchi2={det['dchi2']:.4g} >= {DETECT_DCHI2:g})"
    held = ", ".join(f"{p}={v:.4g}" for p, v in det["held"].items())
    limit = (f"N_tot < {det['N_tot_upper']:.3g} cm-2 ({det['n_sigma']:g} sigma, with {held})"
             if np.isfinite(det["N_tot_upper"]) else "no upper limit (chi2 never rises by "
             f"{det['n_sigma'] ** 2:g} within the scan: lines saturate at {held})")  # fmt: skip
    return f"detection[{mol}]: not detected (dchi2={det['dchi2']:.3g} < {DETECT_DCHI2:g}): {limit}"


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
    margin_kms = np.abs(X[0, 4::5]).max() + 3 * X[0, 3::5].max()
    prep = _prepare(windows, molecules, margin_kms, v_lsr_kms)
    return [T[0] for T in _forward(X, prep, _ref_freq(prep) if dish_m else None)]


# --- command line ---


def read_spec(
    path: str, rms_K: float | None = None, T_bg_K: float = 0.0, beam_arcsec: float | None = None
) -> Window:
    """A SPEC file (two columns: frequency MHz, brightness K) as a Window.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not two numeric columns, or frequencies not strictly monotonic.
    """
    try:
        data = np.loadtxt(path, ndmin=2)
    except FileNotFoundError:
        raise FileNotFoundError(f"SPEC file {path} not found") from None
    except ValueError as err:
        raise ValueError(
            f"SPEC file {path}: expected two numeric columns (MHz, K): {err}"
        ) from None
    if data.shape[1] < 2 or data.shape[0] < 3 or not np.isfinite(data[:, :2]).all():
        raise ValueError(
            f"SPEC file {path}: expected >= 3 rows of two finite columns (MHz, K), "
            f"got shape {data.shape}"
        )
    step = np.diff(data[:, 0])
    if not ((step > 0).all() or (step < 0).all()):
        raise ValueError(f"SPEC file {path}: frequencies must be strictly increasing or decreasing")
    rms = estimate_rms(data[:, 1]) if rms_K is None else rms_K
    return Window(data[:, 0], data[:, 1], rms, T_bg_K, beam_arcsec)


def estimate_rms(T_K: np.ndarray, n_sigma: float = 3.0, n_iter: int = 20) -> float:
    """Noise of a line-rich spectrum: sigma-clipped MAD of the second differences / sqrt(6).

    Second differences cancel lines wider than a few channels, so a line forest does not
    inflate the estimate (ours; on the IRAS 16293-2422 B windows it is within 20 % of the
    archive rms, where a clipped MAD of T itself is 3-5 times too high).
    """
    d2 = T_K[:-2] - 2 * T_K[1:-1] + T_K[2:]
    keep = np.ones(d2.size, bool)
    for _ in range(n_iter):
        med = np.median(d2[keep])
        sigma = 1.4826 * np.median(np.abs(d2[keep] - med))
        new = np.abs(d2 - med) < n_sigma * sigma
        if (new == keep).all():
            break
        keep = new
    return float(sigma / np.sqrt(6))


def parse_assignments(items: list[str], ranged: bool) -> dict:
    """["NAME=LO:HI", ...] (ranged) or ["NAME=VALUE", ...] -> {NAME: (lo, hi) or value}.

    Raises:
        ValueError: an item not of that form.
    """
    out = {}
    for item in items:
        key, _, val = item.rpartition("=")
        try:
            parts = [float(v) for v in val.split(":")]
            assert len(parts) == (2 if ranged else 1) and key
        except (ValueError, AssertionError):
            form = "[MOL:]NAME=LO:HI" if ranged else "[MOL:]NAME=VALUE"
            raise ValueError(f"{item!r}: expected {form} with numbers") from None
        out[key] = tuple(parts) if ranged else parts[0]
    return out


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


def parse_config(argv: list[str] | None = None) -> Config:
    """Config from the command line: one option per field, help from its comment."""
    helps = dict(re.findall(r"^    (\w+):[^#]*#\s*(.*)$", inspect.getsource(Config), re.M))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("fit", "model"), help=helps["command"])
    parser.add_argument("spec", nargs="*", help=helps["spec"])
    for f in dataclasses.fields(Config)[2:]:
        if f.type.startswith("list"):
            kind = float if "float" in f.type else str
            parser.add_argument(
                f"--{f.name}", nargs="+", action="extend", type=kind, default=[], help=helps[f.name]
            )
        else:
            parser.add_argument(
                f"--{f.name}", type=type(f.default), default=f.default, help=helps[f.name]
            )
    return Config(**vars(parser.parse_args(argv)))


def main(cfg: Config) -> dict:
    """Run `fit` (fit, print the table, write JSON and plot) or `model` (write spectra)."""
    # --- data ---
    if not cfg.mol:
        raise ValueError("no molecule: give --mol NAME (e.g. --mol CH3OH)")
    if cfg.beam_arcsec and cfg.dish_m:
        raise ValueError("give --beam_arcsec (interferometer) or --dish_m (single dish), not both")
    if cfg.rms and len(cfg.rms) not in (1, len(cfg.spec)):
        raise ValueError(
            f"--rms has {len(cfg.rms)} values for {len(cfg.spec)} SPEC files; "
            "expected one per file (or one for all)"
        )
    rms = (cfg.rms * len(cfg.spec) if len(cfg.rms) == 1 else cfg.rms) or [None] * len(cfg.spec)
    beam = cfg.beam_arcsec or None
    windows = [read_spec(p, r, cfg.T_bg_K, beam) for p, r in zip(cfg.spec, rms)]
    if cfg.command == "model" and not windows:
        try:
            lo, hi, n = (float(v) for v in cfg.freq_MHz.split(":"))
        except ValueError:
            raise ValueError(f"--freq_MHz {cfg.freq_MHz!r}: expected LO:HI:N") from None
        windows = [Window(np.linspace(lo, hi, int(n)), np.zeros(int(n)), 1.0, cfg.T_bg_K, beam)]
    if not windows:
        raise ValueError("no SPEC file given (fit needs SPEC files; model SPEC or --freq_MHz)")
    f_all = np.concatenate([w.freq_MHz for w in windows]) * (1 + cfg.v_lsr / lte.C_KMS)
    f_range = (f_all.min() * (1 - 1e-3), f_all.max() * (1 + 1e-3))  # +-300 km/s of lines
    molecules = [
        lte.load_molecule(m, catalog=cfg.catalog or None, freq_range_MHz=f_range) for m in cfg.mol
    ]
    fix, dish = parse_assignments(cfg.fix, ranged=False), cfg.dish_m or None
    if cfg.command == "model":
        # --- model ---
        box = make_box([m.name for m in molecules], fix=fix)
        if box["free"].any():
            missing = [n for n, f in zip(box["names"], box["free"]) if f]
            raise ValueError(f"model needs --fix for every parameter; missing: {missing}")
        X = to_physical(np.zeros((1, 0)), box)[0]
        params = {
            m.name: dict(zip(PARAM_NAMES, X[5 * k : 5 * k + 5])) for k, m in enumerate(molecules)
        }
        rng = np.random.default_rng(cfg.seed)
        models = model_windows(windows, molecules, params, cfg.v_lsr, dish)
        for i, (w, T) in enumerate(zip(windows, models)):
            noise = rng.normal(0.0, cfg.rms[min(i, len(cfg.rms) - 1)], T.size) if cfg.rms else 0
            out = Path(cfg.out)
            out = out if len(windows) == 1 else out.with_stem(f"{out.stem}_{i}")
            np.savetxt(out, np.column_stack([w.freq_MHz, T + noise]), fmt="%.9e")
            print(f"wrote={out} n_chan={T.size} peak_K={T.max():.4g}")
        return params
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
    )
    for key in ("note", "fallback"):
        if res[key]:
            print(f"{key}: {res[key]}", file=sys.stderr)
    # --- save ---
    for name in res["params"]:
        for p in PARAM_NAMES:
            note = res["error_notes"][name].get(p, "")
            print(
                f"{name:>10s} {p:>8s} = {res['params'][name][p]:11.4g} +- "
                f"{res['errors'][name][p]:9.3g}  {note}"
            )
    print(
        " ".join(
            f"{k}={res[k]:.6g}" if isinstance(res[k], float) else f"{k}={res[k]}"
            for k in ("loss", "nfev", "time_s", "method", "loss_name", "status")
        ),
        " ".join(f"tau_max[{m}]={t:.3g}" for m, t in res["tau_max"].items()),
    )
    if res["chi2_refine"]:  # issue 14: the pm optimum refined by least squares
        c = res["chi2_refine"]
        print(f"chi2_refine: chi2 {c['chi2_pm']:.6g} -> {c['chi2']:.6g} on {c['n_chan']} channels "
              f"({c['n_dropped']} unexplained left out) nfev={c['nfev']}")  # fmt: skip
    for name, det in res["detection"].items():  # issue 15: detections and upper limits
        print(limit_text(name, det))
    for name, flags in res["at_bound"].items():
        for p, side in flags.items():
            print(f"at_bound[{name}:{p}]={side}: {res['error_notes'][name][p]}")
    if cfg.json:
        nan_to_none = lambda v: None if np.isnan(v) else v  # noqa: E731
        mols = {
            m: {
                **res["params"][m],
                **{f"{p}_err": nan_to_none(e) for p, e in res["errors"][m].items()},
            }
            for m in res["params"]
        }
        out = dict(
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
            config=dataclasses.asdict(cfg),
        )
        with open(cfg.json, "w") as fh:
            json.dump(out, fh, indent=2)
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
