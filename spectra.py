"""Spectra in: SPEC files, the spectral windows in them and their noise (docs/method.md §2, §4).

A SPEC file (two columns: observed frequency MHz, brightness K) becomes one Window (problem.py)
per spectral window found in it, each with the noise of its line-free channels unless the rms is
given; parse_assignments reads the --bounds and --fix values of the command lines.

    import spectra
    windows, why = spectra.read_spec_windows("data/demo_spectrum.txt")
    rms_K = spectra.estimate_rms(windows[0].T_obs_K)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from problem import Window

# --- SPEC files ---


GAP_CHANNELS = 3.0  # a step this many local channel widths long starts a new window
WIDTH_CHANGE = 1.25  # so does a change of channel width by more than this factor


def read_spec(
    path: str, rms_K: float | None = None, T_bg_K: float = 0.0, beam_arcsec: float | None = None
) -> Window:
    """A SPEC file of one window (two columns: frequency MHz, brightness K) as a Window.

    Raises:
        FileNotFoundError: no such file.
        ValueError: those of read_spec_windows, or a file of several windows (read it with
            read_spec_windows).
    """
    windows, why = read_spec_windows(path, rms_K, T_bg_K, beam_arcsec)
    if len(windows) > 1:
        raise ValueError(f"SPEC file {path} holds {len(windows)} windows ({why}): read it with "
                         "read_spec_windows")  # fmt: skip
    return windows[0]


def read_spec_windows(
    path: str, rms_K: float | None = None, T_bg_K: float = 0.0, beam_arcsec: float | None = None
) -> tuple[list[Window], str]:
    """A SPEC file (two columns: frequency MHz, brightness K; # comments) as its windows.

    Several spectral windows exported into one file are split where the frequency jumps by
    more than GAP_CHANNELS channel widths, or where the channel width changes by more than a
    factor WIDTH_CHANGE (split_windows); each window gets its own noise estimate unless rms_K
    is given.

    Returns:
        (windows, why): why says where and why the file was split ("" for one window).
    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not two finite numbers (the message gives the line number),
            fewer than 3 rows, or frequencies not strictly monotonic.
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"SPEC file {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"SPEC file {path} cannot be read as text ({err})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 2:
            raise ValueError(f"SPEC file {path} line {n}: expected two finite columns (MHz, K), "
                             f"got {line.strip()!r}")  # fmt: skip
        try:
            row = (float(words[0]), float(words[1]))
        except ValueError:
            raise ValueError(f"SPEC file {path} line {n}: expected two numeric columns (MHz, K), "
                             f"got {line.strip()!r}") from None  # fmt: skip
        if not all(map(math.isfinite, row)):
            raise ValueError(f"SPEC file {path} line {n}: {line.strip()!r} is not finite; "
                             "expected two finite columns (MHz, K): drop or fill blanked "
                             "channels")  # fmt: skip
        rows.append(row)
    if len(rows) < 3:
        raise ValueError(f"SPEC file {path}: expected >= 3 rows of two finite columns (MHz, K), "
                         f"got {len(rows)}")  # fmt: skip
    freq, T = np.array(rows).T
    step = np.diff(freq)
    if not ((step > 0).all() or (step < 0).all()):
        raise ValueError(f"SPEC file {path}: frequencies must be strictly increasing or decreasing")
    bounds, why = split_windows(freq)
    if any(b - a < 3 for a, b in bounds):
        raise ValueError(f"SPEC file {path}: a window of fewer than 3 channels ({why})")
    windows = [Window(freq[a:b], T[a:b], estimate_rms(T[a:b]) if rms_K is None else rms_K,
                      T_bg_K, beam_arcsec) for a, b in bounds]  # fmt: skip
    return windows, why


def read_spec_files(paths: list[str], rms_K: list | None = None, T_bg_K: float = 0.0,
                    beam_arcsec: float | None = None) -> list[Window]:  # fmt: skip
    """The windows of several SPEC files, in order; a file split into several windows gets a
    note on stderr (read_spec_windows).

    Args:
        paths: SPEC files. rms_K: one noise per file, K (None or [] = estimated per window).
        T_bg_K, beam_arcsec: as for read_spec_windows, for every file.
    """
    windows = []
    for path, rms in zip(paths, rms_K or [None] * len(paths)):
        found, why = read_spec_windows(path, rms, T_bg_K, beam_arcsec)
        if why:
            print(f"note: SPEC file {path} split into {len(found)} windows: {why}", file=sys.stderr)
        windows += found
    if len(windows) > len(paths):
        print(f"windows={len(windows)} from {len(paths)} SPEC files", file=sys.stderr)
    return windows


def split_windows(freq_MHz: np.ndarray) -> tuple[list[tuple[int, int]], str]:
    """(start, stop) channels of the windows of a monotonic frequency grid, and why it was split.

    The local channel width is the running median of 5 steps; a new window starts after a step
    longer than GAP_CHANNELS local widths (a gap) and where the local width changes by more
    than a factor WIDTH_CHANGE (ours). Rounded frequencies (steps of 0.12 and 0.13 MHz) and
    grids uniform in velocity stay one window.
    """
    from scipy.ndimage import median_filter

    width = np.abs(np.diff(freq_MHz))
    local = median_filter(width, size=5, mode="nearest")
    gaps = set(np.flatnonzero(width > GAP_CHANNELS * local))
    ratio = local[1:] / local[:-1]
    changes = set()
    for i in 1 + np.flatnonzero((ratio > WIDTH_CHANGE) | (ratio < 1 / WIDTH_CHANGE)):
        # the junction is the step (i - 1 or i) least like the widths on either side
        unlike = [min(abs(np.log(width[k] / local[i - 1])), abs(np.log(width[k] / local[i])))
                  for k in (i - 1, i)]  # fmt: skip
        changes.add(i - 1 if unlike[0] >= unlike[1] else i)
    changes = {i for i in changes if not gaps & {i - 1, i, i + 1}}  # a gap there already splits
    cuts = sorted(gaps | changes)
    edges = [0, *(i + 1 for i in cuts), freq_MHz.size]
    after = lambda i: local[min(i + 1, local.size - 1)]  # noqa: E731
    notes = [f"gap of {width[i]:.4g} MHz" if i in gaps else
             f"channel width {local[i - 1]:.4g} -> {after(i):.4g} MHz" for i in cuts]  # fmt: skip
    notes = [f"{note} after {freq_MHz[i]:.4f} MHz" for note, i in zip(notes, cuts)]
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])], "; ".join(notes)


def estimate_rms(T_K: np.ndarray, n_sigma: float = 3.0, n_iter: int = 20) -> float:
    """Noise of a spectrum from its line-free channels (ours).

    Lines are the channels further than n_sigma x sigma from the median of the line-free ones,
    each run of them widened by half its length (at least 2 channels) on either side for the
    wings below the threshold; sigma is the standard deviation of the other channels divided by
    that of a unit normal cut at +-c = n_sigma, sqrt(1 - 2 c phi(c) / erf(c / sqrt 2)) (0.9866
    at c = 3; the truncated normal), iterated until the mask settles. The
    start, and the answer when under 20 % of the channels are line-free (a line forest), is the
    sigma-clipped MAD of the second differences / sqrt(6), which lines wider than a few channels
    do not inflate (on the IRAS 16293-2422 B windows it is within 20 % of the archive rms).
    Both assume uncorrelated channels; the first also a flat baseline (continuum subtracted or
    constant).
    """
    T_K = np.asarray(T_K, dtype=float)
    c = n_sigma
    cut = np.sqrt(1 - 2 * c * np.exp(-c * c / 2) / np.sqrt(2 * np.pi) / math.erf(c / np.sqrt(2)))
    sigma = sigma_d2 = _rms_second_differences(T_K, n_sigma, n_iter)
    free = np.ones(T_K.size, bool)
    for _ in range(n_iter):
        line = np.abs(T_K - np.median(T_K[free])) > n_sigma * sigma
        edges = np.flatnonzero(np.diff(np.concatenate([[0], line.astype(np.int8), [0]])))
        new = np.ones(T_K.size, bool)
        for a, b in zip(edges[::2], edges[1::2]):
            grow = max(2, -(-(b - a) // 2))
            new[max(0, a - grow) : b + grow] = False
        if new.sum() < max(16, 0.2 * T_K.size):
            return sigma_d2
        sigma = float(np.std(T_K[new]) / cut)
        if (new == free).all():
            break
        free = new
    return sigma


def _rms_second_differences(T_K: np.ndarray, n_sigma: float, n_iter: int) -> float:
    """Sigma-clipped MAD of the second differences of T_K / sqrt(6)."""
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
