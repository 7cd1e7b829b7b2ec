"""Molecular catalogues and the LTE line model (METHOD §1-§2; XCLASS, Möller et al. 2017).

Reads SPCAT `.cat` entries (CDMS, JPL) with their partition functions, and the XCLASS/CDMS
sqlite layout, and computes the LTE brightness of one molecule in one spectral window for a
batch of parameter sets, each channel the average of the intensity over the channel.

    import lte
    mol = lte.load_molecule("CH3OH")                       # bundled CDMS 032504
    T_K = lte.spectrum(freq_MHz, mol, [[0.5, 150.0, 1e17, 2.0, 0.0]])  # (1, C)

    python lte.py fetch CH3CN            # download a CDMS/JPL entry into the cache (online)
    python lte.py info CH3OH --freq 232000:233000

Parameters (the last axis of `params`): eta, T_ex_K, N_tot_cm2, fwhm_kms, v_off_kms.
Numpy is the fitting path; `spectrum_torch` is the same code on torch tensors (differentiable).
"""

import argparse
import datetime
import difflib
import gzip
import hashlib
import json
import math
import os
import re
import sqlite3
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import erf

C_KMS = 299792.458  # speed of light [km/s]
H_OVER_K_K_PER_MHZ = 4.799243e-5  # h/k [K/MHz]
HC_OVER_K_K_CM = 1.4387769  # hc/k [K cm]: E[K] = 1.4387769 E[cm^-1]
T_CMB_K = 2.726
C2_OVER_8PI = 35.7603  # c^2/(8 pi) for N [cm^-2], A [s^-1], nu [MHz] -> tau [MHz] (METHOD §2)
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
N_SIGMA_MAX = 8.0  # a line's opacity is kept out to this many sigma (at most; see _plan)
DATA_DIR = Path(__file__).resolve().parent / "data"
CACHE_DIR = Path(os.environ.get("SPECTUNER_CACHE", Path.home() / ".cache" / "spectuner_d1"))
CDMS_URL = "https://cdms.astro.uni-koeln.de/classic/entries/"
JPL_URL = "https://spec.jpl.nasa.gov/ftp/pub/catalog/"
PARAM_NAMES = ("eta", "T_ex_K", "N_tot_cm2", "fwhm_kms", "v_off_kms")


@dataclass(frozen=True, eq=False)
class Molecule:
    """Transitions of one catalogue entry, sorted by frequency, and its partition function."""

    name: str
    freq_MHz: np.ndarray  # rest frequency (L,)
    A_s: np.ndarray  # Einstein A (L,) [s^-1]
    g_u: np.ndarray  # upper-state degeneracy (L,)
    E_low_K: np.ndarray  # lower-state energy (L,) [K]
    E_up_K: np.ndarray  # upper-state energy (L,) [K]
    Q_T_K: np.ndarray  # partition-function table temperatures (n,) [K], ascending
    log10_Q: np.ndarray  # log10 Q at Q_T_K (n,)
    source: str = ""  # file (and entry) the data came from

    def Q(self, T_K):
        """Partition function at T_K (METHOD §1: log Q linear in log T, end slopes beyond)."""
        return 10.0 ** log10_partition(np, T_K, self.Q_T_K, self.log10_Q)


# --- partition function and line strengths (METHOD §1-§2) ---


def log10_partition(xp, T_K, table_T_K, table_log10_Q):
    """log10 Q(T) interpolated linearly in log10 T; beyond the table, the end segment's slope.

    Args:
        xp: `numpy` or `torch` (the array namespace of T_K and the tables).
        T_K: temperatures [K], any shape. table_T_K, table_log10_Q: (n,) ascending in T.
    Returns:
        log10 Q with the shape of T_K.
    """
    x_tab = xp.log10(table_T_K)
    x = xp.log10(T_K)
    i = xp.clip(xp.searchsorted(x_tab, x) - 1, 0, len(x_tab) - 2)
    slope = (table_log10_Q[i + 1] - table_log10_Q[i]) / (x_tab[i + 1] - x_tab[i])
    return table_log10_Q[i] + slope * (x - x_tab[i])


def einstein_A_from_lgint(freq_MHz, lgint, g_u, E_low_K, Q300):
    """Einstein A [s^-1] from the SPCAT log10 intensity at 300 K (CDMS documentation, METHOD §1)."""
    E_up_K = E_low_K + H_OVER_K_K_PER_MHZ * freq_MHz
    boltz = np.exp(-E_low_K / 300.0) - np.exp(-E_up_K / 300.0)
    return 2.7964e-16 * 10.0**lgint * freq_MHz**2 * Q300 / (g_u * boltz)


def planck_J_K(xp, freq_MHz, T_K):
    """Radiation temperature J(nu, T) = (h nu/k) / (exp(h nu/k T) - 1) [K] (METHOD §2)."""
    h_nu_k = H_OVER_K_K_PER_MHZ * freq_MHz
    return h_nu_k / xp.expm1(h_nu_k / T_K)


# --- the forward model (METHOD §2) ---


def _ops(params):
    """The array namespace (numpy or torch) and its erf, chosen by the type of `params`."""
    if isinstance(params, np.ndarray):
        return np, erf
    import torch

    return torch, torch.erf


def _check_params(params) -> None:
    """Raise ValueError naming the first bad value in params (..., 5)."""
    p = np.asarray(params.detach().cpu() if hasattr(params, "detach") else params, dtype=float)
    if p.ndim == 0 or p.shape[-1] != 5:
        raise ValueError(f"params must have shape (..., 5) {PARAM_NAMES}, got {p.shape}")
    limits = [(0.0, 1.0), (1e-3, 1e5), (0.0, 1e30), (1e-4, 1e4), (-C_KMS / 2, C_KMS / 2)]
    for k, (lo, hi) in enumerate(limits):
        col = p[..., k]
        bad = ~np.isfinite(col) | (col < lo) | (col > hi)
        if bad.any():
            value = col[bad].ravel()[0]
            raise ValueError(f"{PARAM_NAMES[k]}={value} out of range; expected {lo} to {hi}")


def _channel_edges(freq_MHz: np.ndarray) -> np.ndarray:
    """Edges (C+1,) of channels with centres freq_MHz (C,) ascending: midpoints, ends mirrored."""
    if freq_MHz.size == 1:
        raise ValueError("a window needs at least 2 channels to define the channel width")
    mid = 0.5 * (freq_MHz[1:] + freq_MHz[:-1])
    return np.concatenate([[2 * freq_MHz[0] - mid[0]], mid, [2 * freq_MHz[-1] - mid[-1]]])


def _plan(s_chan, tau_peak, k_per_sigma=4.0, n_sub_max=64):
    """Sub-channels per channel for each row, and the half-window of sub-channels per line.

    A row needs fine sub-channels when its lines are narrow against the channel and not
    optically thin: the edges of a saturated line (where tau ~ 1) are steeper than the line,
    by sqrt(2 ln tau_peak), and must be resolved for the channel average (METHOD §2).
    Args: s_chan, tau_peak (B, L): line sigma in channels, peak opacity.
    Returns: n_sub (B,) powers of 2, K (B,) half-window in sub-channels.
    """
    tmax = tau_peak.max(axis=-1)
    steep = np.sqrt(1.0 + 2.0 * np.log1p(tmax))
    need = k_per_sigma * steep / s_chan.min(axis=-1)
    n_sub = np.where(tmax < 1e-3, 1, np.clip(np.ceil(need), 1, n_sub_max)).astype(int)
    n_sub = 2 ** np.ceil(np.log2(n_sub)).astype(int)  # few distinct values -> few groups
    reach = np.minimum(np.sqrt(2.0 * np.log(np.maximum(tmax, 1.0) / 1e-6)), N_SIGMA_MAX)
    K = np.ceil(reach * s_chan.max(axis=-1) * n_sub).astype(int) + 1
    return n_sub, K


def _average_channels(xp, erf_fn, C, n_sub, K, x, s, tau_chan, amp):
    """Channel averages of amp * (1 - exp(-tau)) with tau on n_sub sub-channels per channel.

    Works in channel-index units (channel i spans [i, i+1)). Each line's opacity on a
    sub-channel is its exact mean there (erf differences), added sparsely: a line touches only
    the 2K+1 sub-channels around its centre (METHOD §2, Cost).
    Args: C channels; x, s (b, L) line centre and sigma [channels]; tau_chan (b, L) integrated
        opacity [channels]; amp (b, C) [K].
    Returns: (b, C) [K].
    """
    b, L = x.shape
    pad = 2 * K + 1  # sub-channels of padding at each end: clipped centres land there
    Fp = n_sub * C + 2 * pad
    j0 = xp.floor(x.detach() * n_sub if xp is not np else x * n_sub)  # (b, L) centre sub-channel
    j0 = xp.clip(j0, -K - 1, n_sub * C + K)  # a line further out touches no channel
    k = xp.arange(-K, K + 2) if xp is np else xp.arange(-K, K + 2, device=x.device, dtype=x.dtype)
    scale = 1.0 / (math.sqrt(2.0) * s)  # (b, L)
    dz = (scale / n_sub)[..., None]  # sub-channel width in z = (nu - mu) / (sqrt(2) sigma)
    z0 = ((j0 - x * n_sub) / n_sub * scale)[..., None]  # (b, L, 1)
    if (
        float(s.min() if xp is np else s.detach().min()) * n_sub >= 2.0
    ):  # sub-channel <= sigma/2: Simpson is exact to ~1e-5
        half = (
            xp.arange(-2 * K, 2 * K + 3)
            if xp is np
            else xp.arange(-2 * K, 2 * K + 3, device=x.device, dtype=x.dtype)
        )
        g = xp.exp(-((z0 + 0.5 * half * dz) ** 2))  # (b, L, 2W+1) at edges and mid-points
        mass = dz / (6.0 * math.sqrt(math.pi)) * (g[..., :-1:2] + 4.0 * g[..., 1::2] + g[..., 2::2])
    else:  # narrow lines: exact unit-area fraction from erf differences
        z = z0 + k * dz  # (b, L, W+1) sub-channel edges
        mass = 0.5 * (erf_fn(z[..., 1:]) - erf_fn(z[..., :-1]))  # (b, L, W)
    tau_bin = (tau_chan * n_sub)[..., None] * mass  # mean opacity on each sub-channel
    j0i = j0.astype(np.int64) if xp is np else j0.long()
    rows = (np.arange(b) if xp is np else xp.arange(b, device=x.device))[:, None] * Fp
    first = (rows + j0i + pad - K)[..., None]  # (b, L, 1) first sub-channel of each window
    flat = first + (np.arange(2 * K + 1) if xp is np else xp.arange(2 * K + 1, device=x.device))
    if xp is np:
        tau = np.bincount(flat.ravel(), weights=tau_bin.ravel(), minlength=b * Fp)
    else:
        tau = xp.zeros(b * Fp, dtype=x.dtype, device=x.device)
        tau = tau.index_add(0, flat.reshape(-1), tau_bin.reshape(-1))
    tau = tau.reshape(b, Fp)[:, pad : pad + n_sub * C]  # (b, n_sub C)
    absorbed = -xp.expm1(-tau).reshape(b, C, n_sub).mean(-1)  # (b, C)
    return amp * absorbed


def _integrated_tau(xp, as_x, lines: Molecule, T_ex, N):
    """tau_t [MHz] of each line (see `spectrum`), T_ex and N (B, 1) -> (B, L)."""
    nu, A, gu, El = (as_x(a) for a in (lines.freq_MHz, lines.A_s, lines.g_u, lines.E_low_K))
    log10_Q = log10_partition(xp, T_ex, as_x(lines.Q_T_K), as_x(lines.log10_Q))
    boltz = xp.exp(-El / T_ex) * -xp.expm1(-H_OVER_K_K_PER_MHZ * nu / T_ex)
    return C2_OVER_8PI * N * A * gu * boltz / (10.0**log10_Q * nu**2)


def spectrum(freq_MHz, mol: Molecule, params, T_bg_K=0.0, cmb: bool = True):
    """LTE brightness of one molecule in one window, channel-averaged (METHOD §2, XCLASS).

    tau_t = (c^2/8pi) N A g_u exp(-E_l/T_ex) (1 - exp(-h nu/k T_ex)) / (Q(T_ex) nu^2)  [MHz]
    T(nu) = eta [J(nu, T_ex) - J(nu, T_CMB) - T_bg] (1 - exp(-sum_t tau_t G(nu; mu_t, sigma_t)))
    with mu_t = nu_t (1 - v_off/c), sigma_t = fwhm/(2 sqrt(2 ln 2)) mu_t/c; each channel records
    the average of T(nu) over its width (the intensity is averaged, not the opacity). Lines
    whose centre lies outside the window still contribute their wings.

    Args:
        freq_MHz: (C,) rest-frame channel centres of one window, ascending or descending,
            C >= 2; channel widths follow from the spacing.
        mol: the molecule (lines out of reach of the window are skipped).
        params: (..., 5) eta, T_ex [K], N_tot [cm^-2], FWHM [km/s], v_off [km/s]; a numpy
            array, or a torch tensor for the differentiable path (the same code runs).
        T_bg_K: continuum brightness under the line [K], scalar or (C,).
        cmb: subtract J(nu, T_CMB) (METHOD §2).
    Returns:
        (..., C) brightness temperature [K], numpy or torch like `params`.
    Raises:
        ValueError: empty or non-finite frequencies, or parameters out of range.
    """
    if isinstance(params, (list, tuple)):
        params = np.asarray(params, dtype=float)
    xp, erf_fn = _ops(params)
    freq = np.asarray(freq_MHz, dtype=float)
    if freq.ndim != 1 or freq.size == 0 or not np.isfinite(freq).all():
        raise ValueError(f"freq_MHz must be a non-empty 1-D finite array, got shape {freq.shape}")
    _check_params(params)
    flip = freq[-1] < freq[0]
    f = freq[::-1].copy() if flip else freq
    edges = _channel_edges(f)
    f0 = edges[0]  # frequencies enter as offsets from f0, so float32 keeps sub-kHz precision
    batch_shape, C = tuple(params.shape[:-1]), len(f)
    P = params.reshape(-1, 5)
    p_np = np.asarray(P.detach().cpu()) if xp is not np else P
    reach_kms = np.abs(p_np[:, 4]).max() + N_SIGMA_MAX * p_np[:, 3].max() / FWHM_PER_SIGMA
    lines = select_lines(mol, f0 * (1 - reach_kms / C_KMS), edges[-1] * (1 + reach_kms / C_KMS))
    if xp is np:
        out, as_x = np.zeros((len(P), C)), np.asarray
    else:
        out = xp.zeros((P.shape[0], C), dtype=P.dtype, device=P.device)

        def as_x(a):
            return xp.tensor(np.asarray(a, dtype=float), dtype=P.dtype, device=P.device)

    if lines.freq_MHz.size:
        nu = as_x(lines.freq_MHz)
        eta, T_ex, N, fwhm, v_off = (P[:, k : k + 1] for k in range(5))  # each (B, 1)
        tau_int = _integrated_tau(xp, as_x, lines, T_ex, N)  # (B, L) [MHz]
        mu = as_x(lines.freq_MHz - f0) - nu * v_off / C_KMS  # centre - f0, (B, L) [MHz]
        sigma = fwhm / FWHM_PER_SIGMA * (nu / C_KMS) * (1.0 - v_off / C_KMS)  # (B, L) [MHz]
        dJ = planck_J_K(xp, as_x(f), T_ex) - as_x(planck_J_K(np, f, T_CMB_K) * cmb)  # (B, C)
        amp = eta * (dJ - as_x(np.broadcast_to(np.asarray(T_bg_K, dtype=float), f.shape)))
        widths = np.diff(edges)
        e_x, w_x = as_x(edges - f0), as_x(widths)
        i = xp.clip(xp.searchsorted(e_x, mu.detach() if xp is not np else mu) - 1, 0, C - 1)
        x = i + (mu - e_x[i]) / w_x[i]  # (B, L) centre in channel-index units
        s_chan, tau_chan = sigma / w_x[i], tau_int / w_x[i]  # sigma and integrated tau [channels]
        s_np, t_np = (
            np.asarray(a.detach().cpu()) if xp is not np else a for a in (s_chan, tau_chan)
        )
        n_sub, K = _plan(s_np, t_np / (math.sqrt(2 * math.pi) * s_np))
        group = n_sub * 4096 + 2 ** np.ceil(np.log2(K)).astype(int)  # similar n_sub and K
        for g in np.unique(group):
            rows = np.flatnonzero(group == g)
            n = int(n_sub[rows[0]])
            step = max(1, int(3e5 // (C * n + 4 * (K[rows].max() + 1) * len(lines.freq_MHz))))
            for s in range(0, len(rows), step):
                r = rows[s : s + step] if xp is np else xp.as_tensor(rows[s : s + step])
                kr = int(K[np.asarray(r)].max())
                val = _average_channels(xp, erf_fn, C, n, kr, x[r], s_chan[r], tau_chan[r], amp[r])
                if xp is np:
                    out[r] = val
                else:
                    out = out.index_copy(0, r.to(P.device), val)
    if flip:
        out = out[:, ::-1] if xp is np else xp.flip(out, (1,))
    return out.reshape(*batch_shape, C)


def peak_opacity(freq_MHz, mol: Molecule, params) -> np.ndarray:
    """Largest line-centre opacity tau_0 = tau_t / (sqrt(2 pi) sigma_t) among the molecule's
    lines whose centre falls in the window (rest frame; tau_t, sigma_t as in `spectrum`).

    A line, not a blend: overlapping lines add their opacities in `spectrum`. tau_0 < 1 means
    optically thin, where the brightness depends on eta and N_tot only through their product.

    Args:
        freq_MHz: (C,) rest-frame channel centres of the window.
        mol: the molecule.
        params: (..., 5) as in `spectrum` (numpy).
    Returns:
        (...) tau_0, 0 where no line falls in the window.
    """
    P = np.asarray(params, dtype=float).reshape(-1, 5)
    _check_params(P)
    freq = np.asarray(freq_MHz, dtype=float)
    v_max = np.abs(P[:, 4]).max()  # centres move by v_off: keep every line that can land inside
    lines = select_lines(mol, freq.min() * (1 - v_max / C_KMS), freq.max() * (1 + v_max / C_KMS))
    if lines.freq_MHz.size == 0:
        return np.zeros(np.shape(params)[:-1])
    tau_int = _integrated_tau(np, np.asarray, lines, P[:, 1:2], P[:, 2:3])  # (B, L) [MHz]
    mu = lines.freq_MHz * (1.0 - P[:, 4:5] / C_KMS)  # (B, L) line centres
    sigma = P[:, 3:4] / FWHM_PER_SIGMA * (lines.freq_MHz / C_KMS) * (1.0 - P[:, 4:5] / C_KMS)
    tau_0 = np.where((mu >= freq.min()) & (mu <= freq.max()), tau_int, 0.0)
    tau_0 = tau_0 / (math.sqrt(2 * math.pi) * sigma)
    return tau_0.max(axis=-1).reshape(np.shape(params)[:-1])


def spectrum_torch(freq_MHz, mol: Molecule, params, T_bg_K=0.0, cmb: bool = True):
    """`spectrum` for a torch tensor `params` (..., 5): the same code, differentiable."""
    import torch

    return spectrum(freq_MHz, mol, torch.as_tensor(params), T_bg_K, cmb)


def select_lines(mol: Molecule, freq_min_MHz: float, freq_max_MHz: float) -> Molecule:
    """The lines of `mol` with rest frequency in [freq_min_MHz, freq_max_MHz] (a new Molecule)."""
    i0, i1 = np.searchsorted(mol.freq_MHz, [freq_min_MHz, freq_max_MHz])
    cut = slice(int(i0), int(i1))
    return Molecule(
        mol.name,
        mol.freq_MHz[cut],
        mol.A_s[cut],
        mol.g_u[cut],
        mol.E_low_K[cut],
        mol.E_up_K[cut],
        mol.Q_T_K,
        mol.log10_Q,
        mol.source,
    )


# --- catalogue readers (METHOD §1) ---


def _open_text(path: Path):
    """Open a text file, gzip-compressed when its name ends in .gz."""
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _decode_gup(field: str) -> int:
    """SPCAT GUP (I3): values above 999 code the hundreds as a letter, 'A' = 10, 'B' = 11, ..."""
    field = field.strip()
    if field[:1].isalpha():
        return (ord(field[0].upper()) - ord("A") + 10) * 100 + int(field[1:] or 0)
    return int(field)


def read_cat(path) -> dict:
    """Read an SPCAT `.cat` (or `.cat.gz`) file: FREQ, ERR, LGINT, DR, ELO, GUP, TAG (METHOD §1).

    Returns:
        dict of arrays freq_MHz, lgint, E_low_cm, g_u and the int `tag` (absolute value).
    Raises:
        ValueError: a line that does not parse, naming file:line.
    """
    path = Path(path)
    cols = {"freq_MHz": [], "lgint": [], "E_low_cm": [], "g_u": []}
    tag = None
    with _open_text(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = (float(line[0:13]), float(line[21:29]), float(line[31:41]))
                gup, line_tag = _decode_gup(line[41:44]), abs(int(line[44:51]))
            except ValueError as err:
                raise ValueError(f"{path}:{n}: not an SPCAT catalogue line ({err}): {line!r}")
            for key, value in zip(cols, (*row, gup)):
                cols[key].append(value)
            tag = line_tag if tag is None else tag
    if tag is None:
        raise ValueError(f"{path}: no catalogue lines")
    return {**{k: np.asarray(v, dtype=float) for k, v in cols.items()}, "tag": tag}


def read_partition_tables(path) -> dict:
    """Partition functions by tag from a CDMS `partfunc.cat`, a JPL `catdir.cat`, or a CDMS
    `catdir.cat` (names only).

    Returns:
        {tag: (name, T_K (n,), log10_Q (n,))}; T_K empty where the file has names only.
    """
    path = Path(path)
    with _open_text(path) as fh:
        text = fh.read().splitlines()
    out = {}
    if text and text[0].lstrip().startswith("|"):  # pipe tables (astroquery's CDMS files)
        head = [h.strip() for h in text[0].strip().strip("|").split("|")]
        temps = [float(m.group(1)) for h in head if (m := re.match(r"lg\(Q\((.*)\)\)", h))]
        for line in text[1:]:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 2 or not cells[0].isdigit():
                continue
            logq = np.asarray(cells[3 : 3 + len(temps)], dtype=float) if temps else np.empty(0)
            ok = np.isfinite(logq)
            out[int(cells[0])] = (cells[1], np.asarray(temps)[ok] if temps else logq, logq[ok])
        return out
    jpl_T = np.array([300.0, 225.0, 150.0, 75.0, 37.5, 18.75, 9.375])
    for n, line in enumerate(text, 1):  # JPL catdir: I6, X, A13, I6, 7F7.4, ...
        if not line.strip():
            continue
        try:
            logq = np.array([float(line[26 + 7 * k : 33 + 7 * k] or "nan") for k in range(7)])
            out[int(line[0:6])] = (
                line[7:20].strip(),
                jpl_T[np.isfinite(logq)],
                logq[np.isfinite(logq)],
            )
        except ValueError as err:
            raise ValueError(f"{path}:{n}: not a catdir line ({err}): {line!r}")
    return out


def read_q_file(path) -> tuple:
    """A two-column partition-function file: T [K] and Q, or log10 Q if a comment says 'log'.

    Returns:
        (T_K (n,), log10_Q (n,)) sorted by temperature.
    """
    path = Path(path)
    with _open_text(path) as fh:
        lines = fh.read().splitlines()
    is_log = any(line.lstrip().startswith("#") and "log" in line.lower() for line in lines)
    try:
        data = np.loadtxt(lines, comments="#", ndmin=2)[:, :2]
    except ValueError as err:
        raise ValueError(f"{path}: expected two columns T_K and Q (or log10 Q): {err}")
    order = np.argsort(data[:, 0])
    T, q = data[order, 0], data[order, 1]
    return T, (q if is_log else np.log10(q))


def make_molecule(name, freq_MHz, A_s, g_u, E_low_K, Q_T_K, log10_Q, source="") -> Molecule:
    """A Molecule from raw arrays: sorted by frequency, E_up derived, Q table sorted by T."""
    order = np.argsort(freq_MHz, kind="stable")
    f, E_low = np.asarray(freq_MHz, float)[order], np.asarray(E_low_K, float)[order]
    qo = np.argsort(Q_T_K)
    if len(qo) < 2:
        raise ValueError(f"{name}: the partition function needs at least 2 temperatures")
    return Molecule(
        name,
        f,
        np.asarray(A_s, float)[order],
        np.asarray(g_u, float)[order],
        E_low,
        E_low + H_OVER_K_K_PER_MHZ * f,
        np.asarray(Q_T_K, float)[qo],
        np.asarray(log10_Q, float)[qo],
        source,
    )


def molecule_from_cat(cat_path, Q_T_K, log10_Q, name=None) -> Molecule:
    """A Molecule from an SPCAT file and the partition function of the same catalogue."""
    cat = read_cat(cat_path)
    E_low_K = HC_OVER_K_K_CM * cat["E_low_cm"]
    Q300 = 10.0 ** log10_partition(
        np, 300.0, np.sort(Q_T_K), np.asarray(log10_Q)[np.argsort(Q_T_K)]
    )
    A = einstein_A_from_lgint(cat["freq_MHz"], cat["lgint"], cat["g_u"], E_low_K, Q300)
    return make_molecule(
        name or str(cat["tag"]),
        cat["freq_MHz"],
        A,
        cat["g_u"],
        E_low_K,
        Q_T_K,
        log10_Q,
        str(cat_path),
    )


def read_xclass(db_path, name: str) -> Molecule:
    """A Molecule from the XCLASS/CDMS sqlite layout (tables Transitions, Partitionfunctions).

    `name` is an entry such as 'CH3OH;v=0;', or a bare 'CH3OH': all its entries, joined when
    they share one partition function (as the vibrational states of one CDMS entry do).
    """
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        names = [r[0] for r in con.execute("SELECT DISTINCT PF_Name FROM Partitionfunctions")]
        picked = [name] if name in names else [n for n in names if n.split(";")[0] == name]
        if not picked:
            raise ValueError(_unknown(name, names, db_path))
        cols = [r[1] for r in con.execute("PRAGMA table_info(Partitionfunctions)")]
        t_cols = [c for c in cols if re.fullmatch(r"PF_\d+_\d+", c)]
        T = np.array([float(c[3:].replace("_", ".")) for c in t_cols])
        sel = ", ".join(t_cols)
        qs = [
            con.execute(f"SELECT {sel} FROM Partitionfunctions WHERE PF_Name=?", (n,)).fetchone()
            for n in picked
        ]
        Q = np.array(qs, dtype=float)
        if not np.allclose(Q, Q[0], rtol=1e-6, equal_nan=True):
            raise ValueError(
                f"{db_path}: '{name}' matches entries with different partition functions; "
                f"pick one of {picked}"
            )
        rows = []
        for n in picked:
            rows += con.execute(
                "SELECT T_Frequency, T_EinsteinA, T_UpperStateDegeneracy, T_EnergyLower "
                "FROM Transitions WHERE T_Name=?",
                (n,),
            ).fetchall()
    finally:
        con.close()
    arr = np.array(rows, dtype=float).reshape(-1, 4)
    ok = np.isfinite(Q[0]) & (Q[0] > 0)
    return make_molecule(
        name,
        arr[:, 0],
        arr[:, 1],
        arr[:, 2],
        HC_OVER_K_K_CM * arr[:, 3],
        T[ok],
        np.log10(Q[0][ok]),
        f"{db_path}:{';'.join(picked)}",
    )


# --- resolving a name to a catalogue entry ---


def _unknown(name, known, where) -> str:
    """The message for an unknown molecule name, with the closest known names (not the numeric
    catalogue tags, unless a tag was asked for)."""
    known = sorted({str(k) for k in known})
    names = known if str(name).strip().isdigit() else [k for k in known if not k.isdigit()]
    close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.4)
    return f"unknown molecule '{name}' in {where}; closest names: {close or names[:10]}"


def _tables_in(*folders: Path) -> dict:
    """Partition tables by tag from every partfunc/catdir file under the folders, in order: the
    first row with Q for a tag wins; name-only rows (a CDMS catdir) fill the gaps."""
    tables = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.cat*")):
            if re.search(r"partfunc|catdir", path.name):
                for tag, (name, T, q) in read_partition_tables(path).items():
                    if tag not in tables or (len(T) and not len(tables[tag][1])):
                        tables[tag] = (name, T, q)
    return tables


def _q_for_cat(cat: Path, tag: int, tables: dict):
    """The partition function of a .cat entry from its own catalogue: a q file beside it with the
    same stem or tag, else the partition table of its catalogue (CDMS and JPL tags differ)."""
    for q in [cat.with_suffix(".qpart"), *sorted(cat.parent.glob(f"q_{tag:06d}*"))]:
        if q.exists():
            return read_q_file(q)
    if tag in tables and len(tables[tag][1]) >= 2:
        return tables[tag][1], tables[tag][2]
    raise ValueError(
        f"{cat}: no partition function for tag {tag:06d} (expected a .qpart or "
        f"q_{tag:06d}*.txt beside it, or a partfunc/catdir table)"
    )


def _folder_entries(folder: Path, tables: dict) -> list:
    """[(names, cat_path, tag)] for every c<tag>*.cat(.gz) under folder, named by `tables`."""
    index = folder / "index.json"
    fetched = json.loads(index.read_text()) if index.exists() else {}
    entries = []
    for path in sorted(folder.rglob("c*.cat*")):
        m = re.fullmatch(r"c(\d{6})(.*?)\.cat(\.gz)?", path.name)
        if not m:
            continue
        tag = int(m.group(1))
        names = {m.group(1), str(tag)}
        names |= {t for t in m.group(2).strip("_-").split("_") if re.search("[A-Za-z]", t)}
        for label in [tables.get(tag, ("",))[0], fetched.get(m.group(1), {}).get("name", "")]:
            if label:
                names |= {label, label.split(",")[0].strip()}
        names.discard("subset")
        entries.append((names, path, tag))
    return entries


def _from_folder(name: str, folder: Path) -> Molecule:
    """The entry called `name` in a catalogue folder; several: a full entry before a subset, then
    the largest file."""
    tables = _tables_in(*dict.fromkeys([folder, DATA_DIR]))  # the folder's own tables first
    entries = _folder_entries(folder, tables)
    hits = [e for e in entries if name in e[0]] or [
        e for e in entries if name.lower() in {n.lower() for n in e[0]}
    ]
    if not hits:
        raise ValueError(_unknown(name, {n for e in entries for n in e[0]}, folder))
    names, path, tag = max(hits, key=lambda e: ("subset" not in e[1].name, e[1].stat().st_size))
    T, q = _q_for_cat(path, tag, tables)
    return molecule_from_cat(path, T, q, name=name)


def _looks_like_path(name: str) -> bool:
    """A catalogue file name, or a path in an existing folder (names such as 'SO2, v2=0/1'
    hold a slash too)."""
    folder = Path(name).parent
    return bool(re.search(r"\.(cat|gz|db|sqlite3?)$", name)) or (
        folder.name != "" and folder.is_dir()
    )


def load_molecule(name_or_path, catalog=None, freq_range_MHz=None) -> Molecule:
    """Load a molecule's transitions and partition function (METHOD §1).

    Args:
        name_or_path: a bare name ('CH3OH', a CDMS/JPL name such as 'CO, v=0', a tag '032504',
            an XCLASS entry 'CH3OH;v=0;') or the path of a `.cat` file.
        catalog: where to resolve a name: a `.cat` file, a folder of them (searched
            recursively, with partfunc/catdir tables or q files), or an XCLASS sqlite file.
            None: the bundled data/ folder, then the cache of `python lte.py fetch`.
        freq_range_MHz: (lo, hi) rest-frequency range to keep, or None for all lines.
    Returns:
        Molecule.
    Raises:
        ValueError: unknown name (the message lists the closest names), unreadable catalogue.
        FileNotFoundError: `catalog` does not exist.
    """
    name = str(name_or_path)
    if catalog is None and Path(name).is_file():
        catalog, name = Path(name), None
    elif catalog is None and _looks_like_path(name):
        raise FileNotFoundError(f"catalogue file {name} not found")
    if catalog is not None:
        catalog = Path(catalog)
        if not catalog.exists():
            raise FileNotFoundError(
                f"catalog {catalog} does not exist "
                "(expected a .cat file, a folder of them, or an XCLASS sqlite file)"
            )
        if catalog.is_dir():
            mol = _from_folder(name, catalog)
        elif catalog.suffix in (".db", ".sqlite", ".sqlite3"):
            mol = read_xclass(catalog, name)
        else:
            tag = read_cat(catalog)["tag"]
            T, q = _q_for_cat(catalog, tag, _tables_in(catalog.parent, DATA_DIR))
            mol = molecule_from_cat(catalog, T, q, name=name or catalog.stem)
    else:
        try:
            mol = _from_folder(name, DATA_DIR)
        except ValueError:
            if not (CACHE_DIR / "index.json").exists():
                raise
            mol = _from_folder(name, CACHE_DIR)
    if freq_range_MHz is not None:
        lo, hi = freq_range_MHz
        if not lo < hi:
            raise ValueError(f"freq_range_MHz=({lo}, {hi}): expected lo < hi")
        mol = select_lines(mol, lo, hi)
    return mol


# --- fetching entries (online users) ---


def fetch(name_or_tag: str, cache=CACHE_DIR, cdms_url=CDMS_URL, jpl_url=JPL_URL, timeout_s=20.0):
    """Download a CDMS or JPL entry into the cache, with its partition function, so that its name
    then resolves in `load_molecule`. Records URL, date and SHA-256 in cache/index.json.

    The CDMS partition function comes from the bundled CDMS table (data/cdms_partfunc.cat);
    the JPL one from the server's catdir.cat, so Q and g_u are always from one catalogue.
    Raises:
        ValueError: unknown name. ConnectionError: the server cannot be reached (offline).
    """
    tables = _tables_in(DATA_DIR)
    text = str(name_or_tag).strip()
    if text.isdigit():
        tag = int(text)
    else:
        hits = [t for t, (n, _, _) in tables.items() if text in (n, n.split(",")[0].strip())]
        if len(hits) != 1:
            choices = [tables[t][0] for t in hits] if hits else None
            raise ValueError(
                f"'{text}' names {len(hits)} entries {choices or ''}; give a tag"
                if hits
                else _unknown(text, [n for n, _, _ in tables.values()], "CDMS/JPL tables")
            )
        tag = hits[0]
    is_cdms = (tag // 100) % 10 == 5  # CDMS tags are xx5xx, JPL tags xx0xx
    base = cdms_url if is_cdms else jpl_url
    url = f"{base.rstrip('/')}/c{tag:06d}.cat"

    def get(u):
        try:
            with urllib.request.urlopen(u, timeout=timeout_s) as resp:
                return resp.read()
        except (urllib.error.URLError, OSError) as err:
            raise ConnectionError(
                f"cannot download {u}: {err} (offline? nothing was written to {cache})"
            )

    body = get(url)
    if is_cdms:
        T, q = (tables[tag][1], tables[tag][2]) if tag in tables else (None, None)
    else:
        tmp = Path(cache) / "jpl_catdir.cat"
        Path(cache).mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(get(f"{jpl_url.rstrip('/')}/catdir.cat"))
        entry = read_partition_tables(tmp).get(tag)
        T, q = (entry[1], entry[2]) if entry else (None, None)
    if T is None or len(T) < 2:
        raise ValueError(
            f"tag {tag:06d}: no partition function in the {'CDMS' if is_cdms else 'JPL'} table"
        )
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"c{tag:06d}.cat").write_bytes(body)
    np.savetxt(
        cache / f"q_{tag:06d}.txt",
        np.c_[T, q],
        header=f"T_K log10Q ({'CDMS' if is_cdms else 'JPL'})",
    )
    index_path = cache / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    name = tables.get(tag, (text,))[0] if not text.isdigit() or tag in tables else text
    index[f"{tag:06d}"] = {
        "name": name,
        "url": url,
        "sha256": hashlib.sha256(body).hexdigest(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    index_path.write_text(json.dumps(index, indent=1))
    return cache / f"c{tag:06d}.cat"


def main(argv=None) -> int:
    """`python lte.py fetch NAME_OR_TAG` or `python lte.py info NAME [--catalog PATH]`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download a CDMS/JPL entry into the cache")
    f.add_argument("name_or_tag")
    f.add_argument("--cache", default=str(CACHE_DIR), help="cache folder")
    f.add_argument("--cdms_url", default=CDMS_URL)
    f.add_argument("--jpl_url", default=JPL_URL)
    i = sub.add_parser("info", help="summarise a molecule's lines")
    i.add_argument("name")
    i.add_argument("--catalog", default=None)
    i.add_argument("--freq", default=None, help="LO:HI rest-frequency range [MHz]")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fetch":
            path = fetch(args.name_or_tag, args.cache, args.cdms_url, args.jpl_url)
            print(f"fetched={path}")
        else:
            rng = tuple(float(x) for x in args.freq.split(":")) if args.freq else None
            mol = load_molecule(args.name, args.catalog, rng)
            q300 = float(mol.Q(300.0))
            print(f"name={mol.name} lines={mol.freq_MHz.size} Q300={q300:.6g} source={mol.source}")
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
