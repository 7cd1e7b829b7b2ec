"""Line forests: synthetic hot-core and hot-corino spectra in ALMA spectral windows (issue 11).

A source is drawn from a seed: one systemic velocity and one line width shared by all molecules,
each with a small scatter; one source temperature, each molecule's T_ex within +-30 % of it; one
filling factor eta = s^2 / (s^2 + b^2) for a Gaussian source of size s in a beam b; and 20-60
(hot_corino) or 10-60 (hot_core) molecules, at most those given, whose column densities are set
relative to CH3OH. The spectrum of a window is exactly

    T_obs(nu) = sum_m lte.spectrum(nu, mol_m, [eta, T_ex_m, N_m, fwhm_m, v_off_m], T_bg) + noise

(the sum over molecules of the project's LTE model, docs/method.md §2), with Gaussian noise,
optionally
Hanning-correlated (kernel 1/4, 1/2, 1/4, rescaled to the drawn rms).

Frame: freq_MHz of every window is a rest frame moving with the windows' reference velocity (as
the real windows once shifted by a nominal v_lsr in states.load_real); each molecule's v_off_kms
is the source's systemic offset v_sys_kms from that frame plus the molecule's own scatter.

Column densities per 1e19 cm^-2 of CH3OH, PILS survey of IRAS 16293-2422 B (Jorgensen et al.
2018, A&A 620, A170; Calcutt et al. 2018, A&A 616, A90): CH3OCHO 2.6e17, CH3OCH3 2.4e17,
C2H5OH 2.3e17, CH3CHO 1.2e17, CH3CN 2e16, C2H5CN 1.5e15, C2H3CN 4.8e14, at 100-300 K and FWHM
~1 km/s; each state draws them in -0.5..+1.0 dex of these (PILS_DEX). The other species' ranges
in SPECIES are this project's assumptions (wide, order-of-magnitude), and isotopologues follow
their parent with 12C/13C = 50 and 32S/34S = 22 (assumed). Hot cores (e.g. G327.3-0.6) have
broader lines, several km/s: preset "hot_core" (not calibrated against data).

Calibration of "hot_corino" (docs/forest.md, `python bench.py forest`): with these ratios at the
PILS N(CH3OH) = 1e19 and eta = 0.3, the 34 catalogue entries available give 6.6 peaks above
4 rms per 1000 channels on the channels of the real IRAS 16293-2422 B windows, which hold 48
(most of B's species and states are missing from the catalogues, or are SLAIM rows). The preset
reaches the real line statistics with a compact source (0.03-0.15" in a 0.3-0.7" beam, eta
0.002-0.2) and N(CH3OH) = 1e21-1e22 in it: the strongest lines are then optically thick and
flat-topped, which the real ones are not.

    import forest
    mols = forest.load_forest_molecules(exclude=train.HOLDOUT)   # cached; ../shared/data/catalogs
    windows, truth = forest.draw_forest(0, mols, target="CH3CN", preset="hot_corino", band=6)
    spectuner.Window(*windows[0])                                # same fields, same order
"""

import dataclasses
import functools
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.signal import find_peaks, peak_widths

import lte

CATALOG_DIR = Path(__file__).resolve().parent.parent / "shared" / "data" / "catalogs"
SPLATALOGUE = "splatalogue/splatalogue_casadata2025_hotcore_subset_60-370GHz.sqlite"
BANDS_GHZ = {3: (84.0, 116.0), 4: (125.0, 163.0), 5: (163.0, 211.0), 6: (211.0, 275.0),
             7: (275.0, 370.0)}  # fmt: skip  # ALMA bands; Band 7 ends at the catalogue's 370 GHz
SPW_WIDTHS_MHZ = (234.375, 468.75, 937.5, 1875.0)  # ALMA spectral-window widths
CHAN_KMS = (0.1, 1.5)  # channel width range [km/s]
N_CHAN = (1000, 4000)  # channels per window
C13, S34 = -np.log10(50.0), -np.log10(22.0)  # isotopologue offsets [dex], assumed ratios
PILS_DEX = (-0.5, 1.0)  # drawn range around the PILS ratios [dex] (see the module docstring)
PILS = {"CH3OCHO": 2.6e17, "CH3OCH3": 2.4e17, "C2H5OH": 2.3e17, "CH3CHO": 1.2e17,
        "CH3CN": 2e16, "C2H5CN": 1.5e15, "C2H3CN": 4.8e14}  # fmt: skip  # per 1e19 CH3OH

# name: (where, catalogue entry, log10 N/N_CH3OH low, high). where: "bundled" (data/), "folder"
# (a .cat under the catalogue folder, as train.py loads it) or "splat" (the Splatalogue rows).
SPECIES = {
    "CH3OH": ("bundled", "CH3OH", 0.0, 0.0),
    **{n: ("splat", n, *np.log10(r / 1e19) + np.array(PILS_DEX)) for n, r in PILS.items()},
    **{
        n: ("folder", n, *np.log10(PILS[n] / 1e19) + np.array(PILS_DEX))
        for n in ("CH3OCH3", "CH3CHO")
    },
    "HCOCH2OH": ("splat", "HCOCH2OH", -2.5, -0.5),
    "HCOOH": ("splat", "t-HCOOH", -2.5, -0.5),
    "CH2CO": ("splat", "H2CCO", -2.5, -0.5),
    "HNCO": ("splat", "HNCO", -3.0, -1.0),
    "NH2CN": ("splat", "NH2CN", -4.5, -2.5),
    "H2CO": ("splat", "H2CO", -2.5, -0.5),
    "H2C-13-O": ("splat", "H213CO", -2.5 + C13, -0.5 + C13),
    "HDCO": ("folder", "HDCO", -3.0, -1.0),
    "H2S": ("splat", "H2S", -2.5, -0.5),
    "HDO": ("splat", "HDO", -3.0, -1.0),
    "CH3CCH": ("splat", "CH3CCH", -3.0, -1.0),
    "c-C3H2": ("splat", "c-C3H2", -4.5, -2.5),
    "C-13-H3CN": ("splat", "13CH3CN", -3.2 + C13, -1.2 + C13),
    "CH3C-13-N": ("splat", "CH313CN", -3.2 + C13, -1.2 + C13),
    "HC3N": ("folder", "HC3N", -4.0, -2.0),
    "DC3N": ("folder", "DC3N", -5.0, -3.0),
    "HC-13-CCN": ("folder", "HC-13-CCN", -4.0 + C13, -2.0 + C13),
    "HCC-13-CN": ("folder", "HCC-13-CN", -4.0 + C13, -2.0 + C13),
    "SO2": ("folder", "SO2", -3.5, -1.0),
    "S-34-O2": ("folder", "S-34-O2", -3.5 + S34, -1.0 + S34),
    "SO": ("splat", "SO", -3.5, -1.0),
    "S-34-O": ("folder", "S-34-O", -3.5 + S34, -1.0 + S34),
    "OCS": ("folder", "OCS", -2.5, -0.5),
    "OCS-34": ("folder", "OCS-34", -2.5 + S34, -0.5 + S34),
    "OC-13-S": ("folder", "OC-13-S", -2.5 + C13, -0.5 + C13),
    "SiO": ("folder", "SiO", -5.0, -3.0),
}
DEFAULT_RATIO = (-4.5, -2.5)  # log10 N/N_CH3OH of a molecule the table does not list (assumed)
ALIASES = {"C2H3CN": {"CH2CHCN"}, "C2H5CN": {"CH3CH2CN"}, "C2H5OH": {"CH3CH2OH"},
           "OCS-34": {"OC34S", "OC(34)S"}, "CH2CO": {"H2CCO"}}  # fmt: skip  # for `exclude`

# Presets: ranges drawn uniformly (log-uniformly for N), per state.
PRESETS = {
    "hot_corino": dict(T_src_K=(100.0, 300.0), fwhm_kms=(0.8, 2.0), log10_N_CH3OH=(21.0, 22.0),
                       source_arcsec=(0.03, 0.15), beam_arcsec=(0.3, 0.7), n_mol=(20, 60),
                       rms_K=(0.1, 0.5), T_bg_K=(0.0, 10.0)),
    "hot_core": dict(T_src_K=(100.0, 300.0), fwhm_kms=(3.0, 8.0), log10_N_CH3OH=(19.5, 21.0),
                     source_arcsec=(0.1, 0.5), beam_arcsec=(0.3, 1.5), n_mol=(10, 60),
                     rms_K=(0.05, 0.5), T_bg_K=(0.0, 30.0)),
}  # fmt: skip
SCATTER = dict(T_frac=0.3, fwhm_frac=0.15, v_kms=0.2, v_sys_kms=3.0)  # per-molecule scatter


class ForestWindow(NamedTuple):
    """One synthetic window; the fields and their order match spectuner.Window."""

    freq_MHz: np.ndarray  # (C,) rest frame of the windows (see the module docstring)
    T_obs_K: np.ndarray  # (C,) sum of lte.spectrum over the molecules, plus noise
    rms_K: float  # noise standard deviation
    T_bg_K: float = 0.0  # continuum under the lines
    beam_arcsec: float | None = None  # circular beam FWHM


# --- catalogues ---


@functools.lru_cache(maxsize=None)
def _load(catalog_dir: str, name: str) -> lte.Molecule:
    """One molecule of SPECIES (or a train.py-style name in the folder), cached per process."""
    where, entry = SPECIES.get(name, ("folder", name, 0, 0))[:2]
    if where == "bundled":
        mol = lte.load_molecule(entry)
    elif where == "splat":
        mol = lte.load_molecule(entry, Path(catalog_dir) / SPLATALOGUE)
    else:
        mol = lte.load_molecule(entry, catalog_dir)
    return dataclasses.replace(mol, name=name)


def is_excluded(name: str, exclude) -> bool:
    """True if `name` or one of its ALIASES is in `exclude` (case-insensitive)."""
    ex = {str(e).lower() for e in exclude}
    names = {name} | ALIASES.get(name, set())
    names |= {k for k, v in ALIASES.items() if name in v}
    return any(n.lower() in ex for n in names)


def load_forest_molecules(catalog_dir=CATALOG_DIR, names=None, exclude=(), quiet=False) -> dict:
    """The forest's molecules {name: lte.Molecule}, loaded once per process (lru_cache).

    Args:
        catalog_dir: the catalogue folder (default ../shared/data/catalogs beside the project):
            .cat entries for "folder" species, Splatalogue rows for "splat" ones.
        names: molecules to load (default: every SPECIES entry).
        exclude: names never returned (held-out molecules, e.g. train.HOLDOUT; ALIASES apply).
        quiet: True silences the `skip molecule=... reason=...` line printed for each entry
            that does not resolve (the shared folder may lack some files).
    Returns:
        {name: Molecule} of the entries that resolve.
    Raises:
        FileNotFoundError: catalog_dir is not a folder.
    """
    if not Path(catalog_dir).is_dir():
        raise FileNotFoundError(
            f"catalogue folder {catalog_dir} not found (expected ../shared/data/catalogs with "
            f"{SPLATALOGUE} and the CDMS/JPL .cat files; pass catalog_dir=...)"
        )
    out = {}
    for name in names if names is not None else SPECIES:
        if is_excluded(name, exclude):
            continue
        try:
            out[name] = _load(str(Path(catalog_dir).resolve()), name)
        except (ValueError, FileNotFoundError) as err:
            if not quiet:
                print(f"skip molecule={name} reason={str(err)[:100]!r}")
    return out


def molecules_per_band(molecules: dict) -> dict:
    """{band: sorted names with at least one line in that ALMA band (rest frame)}."""
    out = {}
    for band, (lo, hi) in BANDS_GHZ.items():
        out[band] = sorted(
            n for n, m in molecules.items() if lte.select_lines(m, lo * 1e3, hi * 1e3).A_s.size
        )
    return out


# --- drawing a source and its windows ---


def _uniform(rng, lo_hi) -> float:
    return float(rng.uniform(*lo_hi))


def draw_source(rng, molecules: dict, target=None, preset: str = "hot_corino") -> dict:
    """The shared kinematics and every molecule's parameters (eta, T_ex_K, N_tot_cm2, fwhm_kms,
    v_off_kms) of one source; `target` (if given) is always among the molecules."""
    if preset not in PRESETS:
        raise ValueError(f"preset '{preset}' unknown; expected one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    src = dict(preset=preset, T_src_K=_uniform(rng, p["T_src_K"]))
    src["fwhm_kms"] = _uniform(rng, p["fwhm_kms"])
    src["v_sys_kms"] = _uniform(rng, (-SCATTER["v_sys_kms"], SCATTER["v_sys_kms"]))
    src["N_CH3OH_cm2"] = 10 ** _uniform(rng, p["log10_N_CH3OH"])
    src["source_arcsec"] = _uniform(rng, p["source_arcsec"])
    src["beam_arcsec"] = _uniform(rng, p["beam_arcsec"])
    src["eta"] = src["source_arcsec"] ** 2 / (src["source_arcsec"] ** 2 + src["beam_arcsec"] ** 2)
    names = sorted(molecules)
    n_lo, n_hi = p["n_mol"]
    n_mol = min(int(rng.integers(n_lo, n_hi + 1)), len(names))
    first = [n for n in dict.fromkeys([target, "CH3OH"]) if n in molecules]
    rest = [n for n in names if n not in first]
    chosen = first + [rest[i] for i in rng.permutation(len(rest))[: max(n_mol - len(first), 0)]]
    params = {}
    for name in chosen:
        lo, hi = SPECIES.get(name, (0, 0, *DEFAULT_RATIO))[2:]
        T_ex = src["T_src_K"] * (1.0 + SCATTER["T_frac"] * rng.uniform(-1.0, 1.0))
        fwhm = src["fwhm_kms"] * max(0.5, 1.0 + SCATTER["fwhm_frac"] * rng.normal())
        v_off = src["v_sys_kms"] + SCATTER["v_kms"] * rng.normal()
        N = src["N_CH3OH_cm2"] * 10 ** rng.uniform(lo, hi)
        params[name] = np.array([src["eta"], T_ex, N, fwhm, v_off])  # lte.PARAM_NAMES order
    src["params"] = params
    src["target"] = target
    return src


def strong_line_MHz(rng, mol: lte.Molecule, T_ex_K: float, lo_MHz: float, hi_MHz: float):
    """A rest frequency among the 10 lines of `mol` in [lo, hi] with the largest integrated
    opacity at T_ex (lte's tau_t up to constants); None without lines there."""
    m = lte.select_lines(mol, lo_MHz, hi_MHz)
    if m.A_s.size == 0:
        return None
    tau = m.A_s * m.g_u * (np.exp(-m.E_low_K / T_ex_K) - np.exp(-m.E_up_K / T_ex_K))
    top = np.argsort(tau / m.freq_MHz**2)[-10:]
    return float(m.freq_MHz[rng.choice(top)])


def _window_axis(rng, band: int, centre_MHz=None) -> np.ndarray:
    """Channel centres (C,) of one ALMA-like window in `band`: width from SPW_WIDTHS_MHZ, 1000-4000
    channels of 0.1-1.5 km/s; centred near centre_MHz when given, else anywhere in the band."""
    lo, hi = (1e3 * f for f in BANDS_GHZ[band])
    for _ in range(100):
        width = float(rng.choice(SPW_WIDTHS_MHZ))
        n_chan = int(rng.integers(N_CHAN[0], N_CHAN[1] + 1))
        mid = centre_MHz if centre_MHz is not None else rng.uniform(lo + width / 2, hi - width / 2)
        dv_kms = width / n_chan / mid * lte.C_KMS
        if CHAN_KMS[0] <= dv_kms <= CHAN_KMS[1]:
            break
    start = mid - width * rng.uniform(0.1, 0.9) if centre_MHz is not None else mid - width / 2
    start = min(max(start, lo), hi - width)
    return start + (np.arange(n_chan) + 0.5) * width / n_chan


def _noise(rng, n: int, rms_K: float, hanning: bool) -> np.ndarray:
    """Gaussian noise of standard deviation rms_K, white or Hanning-correlated (1/4, 1/2, 1/4)."""
    white = rng.normal(0.0, 1.0, n + 2)
    if hanning:
        white = np.convolve(white, [0.25, 0.5, 0.25], mode="same") / np.sqrt(0.375)
    return rms_K * white[1:-1]


def forest_spectrum(freq_MHz, molecules: dict, params: dict, T_bg_K: float = 0.0) -> np.ndarray:
    """Noiseless forest: sum over molecules of lte.spectrum(freq_MHz, mol, params[name], T_bg_K)."""
    total = np.zeros(len(freq_MHz))
    for name, p in params.items():
        total += lte.spectrum(freq_MHz, molecules[name], np.asarray(p)[None], T_bg_K)[0]
    return total


def draw_forest(
    rng,
    molecules: dict,
    target: str | None = None,
    preset: str = "hot_corino",
    band: int = 6,
    n_windows: int = 1,
    exclude=(),
    hanning: bool = False,
) -> tuple:
    """One forest state: windows in one ALMA band and the truth of every molecule.

    Args:
        rng: numpy Generator or an int seed (the state is a function of it).
        molecules: {name: lte.Molecule} the forest may use (e.g. load_forest_molecules()).
        target: a molecule always present; the first window lies on one of its strong lines.
        preset: a key of PRESETS ("hot_corino", "hot_core").
        band: ALMA band 3..7.
        n_windows: windows per state.
        exclude: names never used (ALIASES apply), e.g. train.HOLDOUT in training states.
        hanning: Hanning-correlated noise.
    Returns:
        (windows [ForestWindow], truth dict: params {name: (5,) eta, T_ex_K, N_tot_cm2,
        fwhm_kms, v_off_kms}, noise_K [(C,)], target, preset, band and the source's T_src_K,
        fwhm_kms, v_sys_kms, N_CH3OH_cm2, source_arcsec, beam_arcsec, eta).
    Raises:
        ValueError: unknown band or preset, an excluded or unknown target, no molecules.
    """
    rng = np.random.default_rng(rng)
    if band not in BANDS_GHZ:
        raise ValueError(f"band {band} unknown; expected one of {sorted(BANDS_GHZ)}")
    allowed = {n: m for n, m in molecules.items() if not is_excluded(n, exclude)}
    if target is not None and target not in allowed:
        why = "is excluded" if target in molecules else "is not among the molecules"
        raise ValueError(f"target '{target}' {why}; allowed: {sorted(allowed)[:20]}")
    if not allowed:
        raise ValueError("no molecules left to draw a forest from")
    src = draw_source(rng, allowed, target, preset)
    p = PRESETS[preset]
    rms_K, T_bg_K = _uniform(rng, p["rms_K"]), _uniform(rng, p["T_bg_K"])
    lo, hi = (1e3 * f for f in BANDS_GHZ[band])
    windows, noises = [], []
    for k in range(n_windows):
        centre = None
        if k == 0 and target is not None:
            centre = strong_line_MHz(rng, allowed[target], src["params"][target][1], lo, hi)
        freq = _window_axis(rng, band, centre)
        model = forest_spectrum(freq, allowed, src["params"], T_bg_K)
        noise = _noise(rng, freq.size, rms_K, hanning)
        windows.append(ForestWindow(freq, model + noise, rms_K, T_bg_K, src["beam_arcsec"]))
        noises.append(noise)
    return windows, {**src, "noise_K": noises, "band": band}


# --- line statistics (the realism check of bench.py forest) ---


def line_stats(T_K: np.ndarray, rms_K: float) -> dict:
    """Line statistics of one window: peaks with height and prominence >= 4 rms per 1000
    channels (the criterion of spectuner.find_spans, docs/method.md §4), their heights in rms
    (quantiles 10/50/90 %), the fraction of channels in a line, frac_span (inside a peak's span:
    its width at 25 % of its prominence, as in find_spans), and the fraction above 3 rms."""
    peaks, _ = find_peaks(T_K, height=4.0 * rms_K, prominence=4.0 * rms_K)
    h = T_K[peaks] / rms_K
    q = np.quantile(h, [0.1, 0.5, 0.9]) if h.size else np.full(3, np.nan)
    covered = np.zeros(T_K.size + 1)
    if peaks.size:
        left, right = peak_widths(T_K, peaks, rel_height=0.25)[2:]
        np.add.at(covered, np.ceil(left).astype(int), 1)
        np.add.at(covered, np.floor(right).astype(int) + 1, -1)
    return dict(peaks_per_1000=1e3 * peaks.size / T_K.size, height_q10=q[0], height_q50=q[1],
                height_q90=q[2], frac_span=float(np.mean(np.cumsum(covered)[:-1] > 0)),
                frac_above_3rms=float(np.mean(T_K > 3.0 * rms_K)))  # fmt: skip
