"""The spectra of evaluate.py's comparison (docs/method.md §8): synthetic single windows with a
known truth, line forests of forest.py (trained or held-out targets) and the real IRAS 16293-2422
B windows. `cfg` is evaluate.Config (any object with its fields).

    case = eval_cases.synthetic_case(mol, others, np.random.default_rng(0), cfg)
    case["windows"], case["mol"], case["truth"], case["v_lsr"]
"""

from pathlib import Path

import numpy as np

import lte
import spectuner


def strongest_lines(mol, n: int = 10, T_K: float = 150.0) -> np.ndarray:
    """Frequencies of the n strongest lines by the optically thin LTE proxy at T_K."""
    proxy = mol.A_s * mol.g_u * np.exp(-mol.E_up_K / T_K) / mol.freq_MHz**2
    return mol.freq_MHz[np.argsort(proxy)[::-1][:n]]


def draw_params(rng) -> np.ndarray:
    """One parameter set uniform in the default box of docs/method.md §3 (physical units)."""
    b = spectuner.DEFAULT_BOUNDS
    logu = [rng.uniform(np.log10(b[k][0]), np.log10(b[k][1])) for k in spectuner.PARAM_NAMES[:4]]
    return np.array([*(10.0**x for x in logu), rng.uniform(*b["v_off"])])


def synthetic_case(mol, others, rng, cfg) -> dict:
    """A synthetic window around one of the molecule's strong lines, with noise and confusion."""
    centre = rng.choice(strongest_lines(mol))
    dv_kms = rng.uniform(0.2, 1.0)
    dnu = centre * dv_kms / lte.C_KMS
    freq = centre + dnu * (np.arange(int(cfg.window_MHz / dnu)) - cfg.window_MHz / dnu / 2)
    for _ in range(50):  # draw until the target shows lines (a fit needs something to fit)
        truth = draw_params(rng)
        T = lte.spectrum(freq, mol, truth[None])[0]
        if T.max() > 0.01:
            break
    snr_lo, snr_hi = cfg.snr_range
    rms = T.max() / 10 ** rng.uniform(np.log10(snr_lo), np.log10(snr_hi))
    for other in rng.choice(len(others), size=min(cfg.confusion, len(others)), replace=False):
        T = T + lte.spectrum(freq, others[other], draw_params(rng)[None])[0]
    T = T + rng.normal(0.0, rms, freq.size)
    return dict(windows=[spectuner.Window(freq, T, rms)], mol=mol, truth=truth, v_lsr=0.0)


def forest_cases(group: str, cfg, rng) -> list[dict]:
    """n_spectra line-forest spectra (forest.py, issue 11) whose target is a trained molecule
    in a forest without held-out ones (forest_trained), or a held-out molecule (forest_heldout)."""
    import forest

    held = cfg.heldout
    mols = forest.load_forest_molecules(cfg.catalog, quiet=True)
    exclude = held if group == "forest_trained" else ()
    names = sorted(n for n in mols if forest.is_excluded(n, held) == (group == "forest_heldout"))
    if not names:
        raise ValueError(f"--groups {group}: no target among the forest molecules")
    cases = []
    for i in range(cfg.n_spectra):
        name = names[i % len(names)]
        wins, truth = forest.draw_forest(rng, mols, name, "hot_corino", 6, 1, exclude)
        cases.append(dict(windows=[spectuner.Window(*w) for w in wins], mol=mols[name],
                          truth=truth["params"][name], v_lsr=0.0))  # fmt: skip
    return cases


def real_cases(cfg) -> list[dict]:
    """The IRAS 16293-2422 B windows, one case per molecule with lines in them."""
    folder = Path(cfg.real_dir)
    if not folder.is_dir():
        print(f"skip=real reason='{folder} is absent'")
        return []
    meta = np.genfromtxt(folder / "windows.csv", delimiter=",", names=True)
    windows = []
    keep = None if "all" in cfg.real_spw else {int(s) for s in cfg.real_spw}
    for row in meta:
        if keep is not None and int(row["spw"]) not in keep:
            continue
        path = folder / f"spw{int(row['spw'])}.dat"
        windows.append(spectuner.read_spec(path, float(row["rms_K"]), float(row["T_bg_K"]),
                                           float(row["beam_fwhm_arcsec"])))  # fmt: skip
    cases = []
    for name in cfg.real_mols:
        mol = load(name, cfg)
        cases.append(dict(windows=windows, mol=mol, truth=None, v_lsr=2.7))
    return cases


def load(name: str, cfg):
    """The bundled entry for CH3OH, else the catalogue folder's."""
    if name != "CH3OH" and not Path(cfg.catalog).is_dir():
        raise FileNotFoundError(f"--catalog {cfg.catalog}: no such folder; {name} needs a "
                                "catalogue folder (only CH3OH is bundled)")  # fmt: skip
    return lte.load_molecule(name) if name == "CH3OH" else lte.load_molecule(name, cfg.catalog)
