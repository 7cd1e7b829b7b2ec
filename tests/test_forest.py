"""Tests of forest.py and forest_cube.py (issue 11): the model is the sum of lte.spectrum plus the
noise, held-out molecules never enter a state, the preset's line density against the real
IRAS 16293-2422 B windows, and the cube's truth maps through FITS and fit_cube.read_cube."""

import csv
import sys

import numpy as np
import pytest
from astropy.io import fits

import fit_cube
import forest
import forest_cube
import lte
import spectuner

HOLDOUT = ("CH3OCHO", "CH3OCH3", "C2H3CN", "OCS-34")  # train.HOLDOUT


def _toy(name, f0_MHz, n=40, A=1e-4):
    """A molecule with n lines 2 MHz apart from f0_MHz and a flat-ish partition function."""
    f = f0_MHz + 2.0 * np.arange(n)
    return lte.make_molecule(name, f, np.full(n, A), np.full(n, 21.0), np.linspace(10, 200, n),
                             [10.0, 100.0, 1000.0], [1.0, 2.0, 3.0])  # fmt: skip


@pytest.fixture
def toy():
    """Ten toy molecules with lines across one Band 6 stretch, named like the forest's."""
    names = ["CH3OH", "CH3CN", "C2H5OH", "SO2", "HC3N", *HOLDOUT, "OC34S"]
    return {n: _toy(n, 230000.0 + 37.0 * k, n=300) for k, n in enumerate(names)}


def test_spectrum_is_sum_of_lte_plus_noise(toy, monkeypatch):
    monkeypatch.setitem(forest.BANDS_GHZ, 6, (230.0, 231.0))  # keep the windows on the toy lines
    windows, truth = forest.draw_forest(3, toy, target="CH3CN", n_windows=2)
    again, _ = forest.draw_forest(3, toy, target="CH3CN", n_windows=2)
    for w, w2, noise in zip(windows, again, truth["noise_K"]):
        model = sum(lte.spectrum(w.freq_MHz, toy[n], p[None], w.T_bg_K)[0]
                    for n, p in truth["params"].items())  # fmt: skip
        np.testing.assert_allclose(w.T_obs_K, model + noise, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(w.T_obs_K, w2.T_obs_K)  # same seed, same state
        assert abs(np.std(noise) / w.rms_K - 1) < 0.1 and model.max() > 10 * w.rms_K
    assert "CH3CN" in truth["params"] and truth["target"] == "CH3CN"
    assert forest.ForestWindow._fields == spectuner.Window._fields  # the lead converts by *w
    T_ex = np.array([p[1] for p in truth["params"].values()])
    assert np.all(np.abs(T_ex / truth["T_src_K"] - 1) <= 0.3 + 1e-12)  # +-30 % of the source


def test_holdout_never_in_training_states(toy, monkeypatch):
    monkeypatch.setitem(forest.BANDS_GHZ, 6, (230.0, 231.0))
    for seed in range(30):
        target = ["CH3OH", "CH3CN", "SO2"][seed % 3]
        _, truth = forest.draw_forest(seed, toy, target=target, exclude=HOLDOUT)
        assert not set(truth["params"]) & {*HOLDOUT, "OC34S"}  # OC34S: an alias of OCS-34
    with pytest.raises(ValueError, match="excluded"):
        forest.draw_forest(0, toy, target="CH3OCHO", exclude=HOLDOUT)
    with pytest.raises(ValueError, match="band"):
        forest.draw_forest(0, toy, band=9)
    with pytest.raises(ValueError, match="preset"):
        forest.draw_forest(0, toy, preset="disk")
    with pytest.raises(ValueError, match="not among the molecules"):
        forest.draw_forest(0, toy, target="NH2CHO")
    with pytest.raises(ValueError, match="no molecules left"):
        forest.draw_forest(0, toy, exclude=list(toy))
    _, broad = forest.draw_forest(0, toy, preset="hot_core")
    assert 3.0 <= broad["fwhm_kms"] <= 8.0 and len(broad["params"]) >= 10


def test_hanning_noise_is_correlated():
    rng = np.random.default_rng(0)
    white, hann = forest._noise(rng, 20000, 0.2, False), forest._noise(rng, 20000, 0.2, True)
    lag1 = [np.corrcoef(x[1:], x[:-1])[0, 1] for x in (white, hann)]
    assert abs(lag1[0]) < 0.03 and abs(lag1[1] - 2 / 3) < 0.03  # Hanning: rho_1 = 2/3
    assert abs(hann.std() - 0.2) < 0.01


def test_missing_catalogue_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="catalogue folder"):
        forest.load_forest_molecules(tmp_path / "nowhere")


def test_hot_corino_line_density_brackets_real(shared_data):
    """The real peaks per 1000 channels (about 49) lie in the preset's 10-90 % range (40
    states; bench.py forest measures 200)."""
    real = []
    folder = shared_data / "spectra" / "iras16293b"
    with open(folder / "windows.csv") as fh:
        for row in csv.DictReader(fh):
            T = np.loadtxt(folder / f"spw{row['spw']}.dat")[:, 1]
            real.append(forest.line_stats(T, float(row["rms_K"]))["peaks_per_1000"])
    mols = forest.load_forest_molecules(shared_data / "catalogs", exclude=())
    sim = [forest.line_stats(w.T_obs_K, w.rms_K)["peaks_per_1000"]
           for w in (forest.draw_forest(s, mols, band=6)[0][0] for s in range(40))]  # fmt: skip
    lo, hi = np.quantile(sim, [0.1, 0.9])
    assert 40 < np.median(real) < 60 and lo <= np.median(real) <= hi


def test_cube_truth_round_trip(shared_data, tmp_path, monkeypatch):
    out = tmp_path / "forest.fits"
    catalog = str(shared_data / "catalogs")
    cfg = forest_cube.Config(out=str(out), n_pix=4, n_chan=200, n_mol=3, seed=1,
                             catalog=catalog, exclude=["CH3OCHO"])  # fmt: skip
    maps = forest_cube.make_cube(cfg)
    assert "CH3OH" in maps and "CH3OCHO" not in maps and len(maps) == 3
    with fits.open(out) as hdul:
        for name, m in maps.items():
            for k, param in enumerate(forest_cube.MAP_NAMES):
                np.testing.assert_allclose(hdul[f"TRUE_{name.upper()}_{param}"].data, m[..., k])
    cube = fit_cube.read_cube(str(out))
    assert cube["data"].shape == (200, 4, 4) and cube["unit"] == "Jy/beam"
    assert abs(cube["v_lsr_kms"] - cfg.v_lsr_kms) < 1e-9 and cube["specsys"] == "LSRK"
    T = cube["data"][:, 2, 2] * cube["K_per_unit"]  # back to K: the centre pixel's forest
    rest = cube["freq_MHz"] * (1 + cfg.v_lsr_kms / lte.C_KMS)
    mols = forest.load_forest_molecules(cfg.catalog, names=list(maps))
    model = forest.forest_spectrum(rest, mols, {n: m[2, 2] for n, m in maps.items()})
    noise_K = cfg.rms_mJy * 1e-3 * cube["K_per_unit"]
    assert np.std(T - model) < 1.5 * noise_K.mean() and model.max() > 20 * noise_K.mean()
    monkeypatch.setattr(sys, "argv", ["x"])
    assert forest_cube.main(["cube", str(tmp_path / "no" / "x.fits")]) == 2
    assert forest_cube.main(["cube", str(out), "--band", "9"]) == 2
    assert forest_cube.main(["cube", str(out), "--exclude", "CH3OH"]) == 2
    assert forest_cube.main(["cube", str(out), "--n_pix", "1"]) == 2


def test_holdout_absent_from_loaded_catalogue(shared_data):
    mols = forest.load_forest_molecules(shared_data / "catalogs", exclude=HOLDOUT)
    assert len(mols) >= 25 and not set(mols) & set(HOLDOUT)
    assert {"CH3OH", "CH3CN", "C2H5CN", "C2H5OH"} <= set(mols)
    for seed in range(10):
        _, truth = forest.draw_forest(seed, mols, target="CH3CN", band=7, exclude=HOLDOUT)
        assert not set(truth["params"]) & set(HOLDOUT)
    per_band = forest.molecules_per_band(mols)
    assert "CH3CHO" in per_band[3] and "CH3CHO" not in per_band[6]  # a 78-151 GHz subset
