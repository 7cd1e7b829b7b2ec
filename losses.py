"""The two losses of a model against an observed window (docs/method.md §4), batched over models.

chi2 = 0.5 mean(((T_obs - T_model) / rms)^2) and Spectuner's peak matching (pm; Qiu et al.
2025, ApJS 277, 21), each (B, C) -> (B,). `chi2_on` and `pm_on` give the same values for
models that are zero outside a subset of channels at the cost of that subset: the fitting
problem (problem.py) evaluates the model only where its lines reach. numpy and scipy only.

    import numpy as np, losses
    L = losses.loss_pm(T_model, T_obs, rms_K=0.1)                 # (B,)
    win = losses.window_constants(T_obs, 0.1)
    L2 = losses.pm_on(T_model[:, idx], idx, win, exact_row=None)  # == L where T_model is 0 off idx
"""

import bisect
import math

import numpy as np
from scipy.signal import find_peaks, peak_widths

PEAK_SIGMA = 4.0  # §4: peaks need height and prominence >= 4 rms


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
    return _merged_spans(T_K, *_peaks(T_K, PEAK_SIGMA * rms, PEAK_SIGMA * np.median(rms)))


def _peaks(T_K, height, prominence):
    """(peaks, left, right): find_peaks' peaks and their edges at 25 % of the prominence below
    the top (peak_widths' left_ips and right_ips, on find_peaks' own prominences)."""
    peaks, p = find_peaks(T_K, height=height, prominence=prominence)
    base = (p["prominences"], p["left_bases"], p["right_bases"])
    return (peaks, *peak_widths(T_K, peaks, rel_height=0.25, prominence_data=base)[2:])


def _merged_spans(T_K, peaks, left, right):
    """(spans, tops, peaks) of find_spans for the given peaks of T_K and their edges."""
    if peaks.size == 0:
        return np.empty((0, 2)), np.empty(0, dtype=int), peaks
    order = np.argsort(left, kind="stable")
    left, right, pk = left[order], right[order], peaks[order]
    reach = np.maximum.accumulate(right)
    new = np.empty(left.size, dtype=bool)
    new[0] = True
    np.greater(left[1:], reach[:-1], out=new[1:])  # a new span starts here
    group = np.cumsum(new) - 1
    starts = new.nonzero()[0]
    spans = np.stack([left[starts], np.maximum.reduceat(right, starts)], axis=1)
    best = np.lexsort((np.arange(pk.size), -T_K[pk], group))  # per span: highest, then first
    tops = pk[best[np.searchsorted(group[best], np.arange(starts.size))]]
    return spans, tops, peaks


def _cum_trapz(Y: np.ndarray) -> np.ndarray:
    """Trapezoid integral of Y (..., C) from channel 0 to each channel, (..., C)."""
    out = np.zeros(Y.shape)
    np.cumsum(0.5 * (Y[..., 1:] + Y[..., :-1]), axis=-1, out=out[..., 1:])
    return out


def _span_means(y: np.ndarray, cum: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Means of the linear interpolant of y (..., C) (channels 0..C-1) over spans [a, b]
    (fractional), (..., n): the exact integral of the interpolant (= the trapezoid rule on its
    breakpoints) divided by the width; its value at a for a span of width 0. cum =
    _cum_trapz(y) makes each span O(1); the leading axes of y are done at once.
    """
    last = y.shape[-1] - 2

    def at(x):  # (integral from channel 0, value) of the interpolant at x
        i = np.minimum(np.maximum(np.floor(x).astype(int), 0), last)
        t = x - i
        y0 = y[..., i]
        dy = y[..., i + 1] - y0
        return cum[..., i] + t * y0 + 0.5 * t * t * dy, y0 + t * dy

    width = b - a
    inside = width > 0
    ints, vals = at(np.concatenate([b, a]))  # both ends in one gather
    int_b, int_a, y_a = ints[..., : b.size], ints[..., b.size :], vals[..., b.size :]
    return np.where(inside, (int_b - int_a) / np.where(inside, width, 1.0), y_a)


def fp_weight(x: float, peaks_obs: np.ndarray, n_chan: int) -> float:
    """False-positive weight at channel x: 0 at an observed peak, 1 half-way to the next (§4).

    Beyond the outermost peaks the half-gap on their inner side is used, and half the window
    when there is one observed peak (ours); with none the weight is 1.
    """
    return float(fp_weights(np.array([x], dtype=float), peaks_obs, n_chan)[0])


def fp_weights(x: np.ndarray, peaks_obs: np.ndarray, n_chan: int) -> np.ndarray:
    """fp_weight at each channel of x (n,)."""
    p = np.sort(peaks_obs).astype(float)
    if p.size == 0:
        return np.ones(x.shape)
    half = (p[1:] - p[:-1]) / 2 if p.size > 1 else np.array([n_chan / 2])
    j = np.searchsorted(p, x)
    inner = (j > 0) & (j < p.size)
    k = np.minimum(np.maximum(j, 1), max(p.size - 1, 1))  # the gap (p[k-1], p[k]) of inner x
    w_in = np.minimum(x - p[k - 1], p[np.minimum(k, p.size - 1)] - x) / half[k - 1]
    w_out = np.abs(x - p[np.minimum(j, p.size - 1)]) / np.where(j == 0, half[0], half[-1])
    return np.minimum(1.0, np.where(inner, w_in, w_out))


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
    obs = find_spans(T_obs, rms_K) if obs is None else obs
    rms = np.broadcast_to(rms_K, T_obs.shape)
    resid = np.abs(T_obs - T_model)  # (B, C)
    out = np.mean(resid, axis=-1)
    for b, T_m in enumerate(T_model):
        spans_m, tops_m, _ = find_spans(T_m, rms)
        out[b] += _peak_terms(T_m, T_obs, resid[b], PEAK_SIGMA * rms, spans_m, tops_m, obs,
                              0.0, T_obs.size)  # fmt: skip
    return out


def _peak_terms(T_m, T_obs, resid, floor, spans_m, tops_m, obs, shift, n_chan):
    """True- and false-positive terms of pm for one model (§4).

    The arrays (T_m, T_obs, resid = |T_obs - T_m|, floor = 4 rms) may be a
    subset of the window's channels, laid out so that each model span lies in one stretch of
    consecutive channels; `shift` (per model span, or 0) takes a span's position there to its
    channel in the window, where the observed spans and peaks `obs` live (n_chan channels).
    """
    if spans_m.size == 0:
        return 0.0
    spans_o, _, peaks_o = obs
    shift = np.broadcast_to(shift, spans_m.shape[:1])
    lo = np.maximum(spans_o[None, :, 0], (spans_m[:, 0] + shift)[:, None])  # (n_m, n_o)
    hi = np.minimum(spans_o[None, :, 1], (spans_m[:, 1] + shift)[:, None])  # overlaps I
    im, io = np.nonzero(hi > lo)
    total = 0.0
    if im.size:  # true positives: every overlap of an observed and a model span
        a, c = lo[im, io] - shift[im], hi[im, io] - shift[im]
        Y = np.stack([T_obs, T_m, resid])
        obs_I, mod_I, res_I = _span_means(Y, _cum_trapz(Y), a, c)
        width_o = spans_o[io, 1] - spans_o[io, 0]
        dice = 2 * (c - a) / (width_o + spans_m[im, 1] - spans_m[im, 0])
        term = res_I - dice * obs_I
        total += np.where(mod_I < obs_I, np.minimum(term, 0.0), term).sum()  # blends
    lonely = np.flatnonzero(~(hi > lo).any(axis=1))
    if lonely.size:  # false positives: model peaks where nothing was observed
        a, c = spans_m[lonely, 0], spans_m[lonely, 1]
        Y = np.maximum(0, T_m - np.stack([T_obs, floor]))  # above the data, above 4 rms
        excess = _span_means(Y, _cum_trapz(Y), a, c).min(axis=0)
        tops = tops_m[lonely] + shift[lonely]
        total += np.dot([fp_weight(t, peaks_o, n_chan) for t in tops], excess)
    return total


LOSSES = {"chi2": loss_chi2, "pm": loss_pm}


# --- the same losses for models that are zero outside a subset of channels ---


def runs_of(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start positions in idx of its runs of consecutive channels, and each run's shift
    (channel in the window - position in idx)."""
    new = np.empty(idx.size, dtype=bool)
    new[:1] = True
    np.not_equal(idx[1:] - idx[:-1], 1, out=new[1:])
    starts = new.nonzero()[0]
    return starts, idx[starts] - starts


def chi2_on(T_model: np.ndarray, idx: np.ndarray, win: dict) -> np.ndarray:
    """loss_chi2 of models (B, n) that are 0 outside the channels idx (n,), at the cost of n.

    win: window_constants of the observed window. The untouched channels add their
    (T_obs / rms)^2, summed once (§4).
    """
    z_obs = win["T_obs"][idx] / win["rms"][idx]
    z = z_obs - T_model / win["rms"][idx]
    return 0.5 * ((z * z).sum(-1) + win["sq_total"] - (z_obs * z_obs).sum()) / win["T_obs"].size


def pm_on(T_model: np.ndarray, idx: np.ndarray, win: dict, exact_row) -> np.ndarray:
    """loss_pm of models (B, n) that are 0 outside the channels idx (n,), at the cost of n.

    idx must hold, besides every channel a model touches, the channel on each side of each
    run (0 there), so that spans end inside their run. The untouched channels add |T_obs| to
    the residual term (summed once); peaks exist only where the model is not 0 (§4). Peak
    finding on idx alone gives the window's peaks, prominences and widths: collapsing the
    zero stretches between runs changes no minimum between peaks. The B rows are searched in
    one signal, each followed by a wall above every value: no peak, prominence or width
    search crosses a wall, so each row's peaks are its own. A row whose span would cross a
    run (only when deep absorption lowers the 25 % level below 0) is handed to exact_row(b),
    the dense loss of row b.
    """
    T_obs, rms, C = win["T_obs"][idx], win["rms"][idx], win["T_obs"].size
    floor = PEAK_SIGMA * rms
    resid = np.abs(T_obs - T_model)  # (B, n)
    out = (resid.sum(-1) + win["abs_total"] - np.abs(T_obs).sum()) / C
    rows = np.logical_or.reduce(T_model >= floor, axis=-1).nonzero()[0]  # no 4 rms: no peak
    if rows.size == 0:
        return out
    if len(T_model) == 1:  # SLSQP's single points: the same numbers with fewer numpy calls
        return _pm_row(T_model[0], idx, T_obs, floor, resid[0], out, win, exact_row)
    m, n = rows.size, idx.size
    stride = n + 1
    sig = np.empty((m, stride))
    sig[:, :n], sig[:, n] = T_model[rows], T_model[rows].max() + 1.0  # rows, walls
    height = np.zeros((m, stride))  # 0 at the walls
    height[:, :n] = floor
    peaks, left, right = _peaks(sig.ravel(), height.ravel(), win["prominence"])
    own = peaks % stride != n  # not a wall
    spans, tops, _ = _merged_spans(sig.ravel(), peaks[own], left[own], right[own])
    if spans.size == 0:
        return out
    r = spans[:, 0].astype(int) // stride  # row (in rows) of each span
    local = spans - (r * stride)[:, None]
    starts, shift = runs_of(idx)
    run = np.searchsorted(starts, np.floor(local), side="right") - 1  # (n_m, 2)
    cross = run[:, 0] != run[:, 1]
    crossed = np.unique(r[cross]) if cross.any() else np.empty(0, dtype=int)
    Y = np.zeros((3, m, stride))  # T_obs, T_model, |resid| per row, 0 at the walls
    Y[0, :, :n], Y[1, :, :n], Y[2, :, :n] = T_obs, T_model[rows], resid[rows]
    tops, shift = tops - r * stride, shift[run[:, 0]]
    extra = _peak_terms_rows(Y.reshape(3, -1), height.ravel(), spans, local, tops, r, shift, win, m)
    extra[crossed] = 0.0
    out[rows] += extra
    for i in crossed:
        out[rows[i]] = exact_row(rows[i])
    return out


def _peak_terms_rows(Y, floor, spans, local, tops, r, shift, win, m):
    """True- and false-positive terms of pm (§4) of m rows at once: Y (3, m * stride) holds
    T_obs, T_model and |resid| of each row, floor 4 rms (0 at the walls); spans (n_m, 2) the
    model spans in that layout, local (n_m, 2) and tops (n_m,) the same within their row, r
    (n_m,) their row, shift their run's shift to window channels (where obs lives)."""
    spans_o, _, peaks_o = win["obs"]
    C = win["T_obs"].size
    out = np.zeros(m)
    full = local + shift[:, None]  # model spans in window channels
    lo = np.maximum(spans_o[None, :, 0], full[:, 0:1])  # (n_m, n_o) overlaps I
    hi = np.minimum(spans_o[None, :, 1], full[:, 1:2])
    im, io = np.nonzero(hi > lo)
    cum = _cum_trapz(Y)
    if im.size:  # true positives: every overlap of an observed and a model span
        to_sig = (spans[im, 0] - local[im, 0])[:, None]  # window channel -> signal position
        a, c = lo[im, io] - shift[im] + to_sig[:, 0], hi[im, io] - shift[im] + to_sig[:, 0]
        obs_I, mod_I, res_I = _span_means(Y, cum, a, c)
        width_o = spans_o[io, 1] - spans_o[io, 0]
        dice = 2 * (c - a) / (width_o + spans[im, 1] - spans[im, 0])
        term = res_I - dice * obs_I
        term = np.where(mod_I < obs_I, np.minimum(term, 0.0), term)  # blends
        out += np.bincount(r[im], weights=term, minlength=m)
    lonely = np.flatnonzero(~(hi > lo).any(axis=1))
    if lonely.size:  # false positives: model peaks where nothing was observed
        Z = np.maximum(0, Y[1] - np.stack([Y[0], floor]))  # above the data, above 4 rms
        a, c = spans[lonely, 0], spans[lonely, 1]
        excess = _span_means(Z, _cum_trapz(Z), a, c).min(axis=0)
        weight = fp_weights(tops[lonely] + shift[lonely], peaks_o, C)
        out += np.bincount(r[lonely], weights=weight * excess, minlength=m)
    return out


def _pm_row(T_m, idx, T_obs, floor, resid, out, win, exact_row):
    """pm_on of one model T_m (n,) reaching floor, out (1,) its residual term: spans, overlaps
    and sums in python floats, in pm_on's order; the span means on pm_on's (n + 1) layout."""
    peaks, left, right = _peaks(T_m, floor, win["prominence"])  # no wall: the ends stop it
    peaks, left, right, T_pk = peaks.tolist(), left.tolist(), right.tolist(), T_m[peaks].tolist()
    spans = []  # [left, right, top channel, top value], in order of left edge (stable)
    for k in sorted(range(len(peaks)), key=left.__getitem__):
        if spans and left[k] <= spans[-1][1]:  # merged: the widest reach, the first highest top
            spans[-1][1] = max(spans[-1][1], right[k])
            if T_pk[k] > spans[-1][3]:
                spans[-1][2:] = peaks[k], T_pk[k]
        else:
            spans.append([left[k], right[k], peaks[k], T_pk[k]])
    starts, shift = (v.tolist() for v in runs_of(idx))
    obs, obs_right = win["obs"][0].tolist(), win["obs"][0][:, 1].tolist()  # disjoint, sorted
    ends, widths, lone, tops = [], [], [], []  # overlaps; model spans with none
    for a, c, top, _ in spans:
        run = bisect.bisect_right(starts, math.floor(a)) - 1
        if run != bisect.bisect_right(starts, math.floor(c)) - 1:
            out[0] = exact_row(0)
            return out
        d, n_ends = shift[run], len(ends)
        for o0, o1 in obs[bisect.bisect_right(obs_right, a + d) :]:  # from the first o1 > a + d
            if o0 >= c + d:
                break
            lo, hi = max(o0, a + d), min(o1, c + d)
            if hi > lo:
                ends.append((lo - d, hi - d))
                widths.append((o1 - o0) + c - a)
        if len(ends) == n_ends:
            lone.append((a, c))
            tops.append(top + d)
    n, k = idx.size, len(ends)
    Y = np.zeros((5 if lone else 3, n + 1))  # T_obs, T_m, resid; Z: 0 at the end as in pm_on
    Y[0, :n], Y[1, :n], Y[2, :n] = T_obs, T_m, resid
    if lone:  # above the data, above 4 rms
        np.maximum(0, T_m - np.stack([T_obs, floor]), out=Y[3:, :n])
    a, c = np.array(ends + lone).reshape(-1, 2).T  # none: T_m has no peak
    means = _span_means(Y, _cum_trapz(Y), a, c)
    tp = 0.0
    for a, c, w, o, m, r in zip(*np.array(ends).T.tolist(), widths, *means[:3, :k].tolist()):
        term = r - 2 * (c - a) / w * o
        tp += min(term, 0.0) if m < o else term  # blends
    fp = 0.0
    if lone:
        weight = fp_weights(np.array(tops, dtype=float), win["obs"][2], win["T_obs"].size)
        for v in (weight * means[3:, k:].min(axis=0)).tolist():
            fp += v
    out[0] += tp + fp
    return out


def window_constants(T_obs: np.ndarray, rms_K) -> dict:
    """What the losses on a subset of channels need of one observed window, computed once."""
    rms = np.broadcast_to(np.asarray(rms_K, dtype=float), T_obs.shape)
    return dict(T_obs=T_obs, rms=rms, obs=find_spans(T_obs, rms),
                prominence=PEAK_SIGMA * np.median(rms), abs_total=np.abs(T_obs).sum(),
                sq_total=((T_obs / rms) ** 2).sum())  # fmt: skip


LOSSES_ON = {"chi2": lambda T, idx, win, exact_row: chi2_on(T, idx, win), "pm": pm_on}
