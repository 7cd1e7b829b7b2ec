"""The fitting problem: its loss on the channels the lines reach equals the loss on all channels."""

import csv

import numpy as np
import pytest

import lte
import problem


def _box_points(rng, box, n):
    """n unit-cube points over the whole box, with 30 km/s and 0.3 km/s lines among them."""
    U = rng.random((n, int(box["free"].sum())))
    U[: n // 8, 3] = 1.0  # the widest lines of the box
    U[n // 8 : n // 4, 3] = 0.0  # the narrowest
    U[n // 4 : 3 * n // 8, 3] = rng.uniform(0.0, 0.2, n // 8)  # narrow and bright
    U[n // 4 : 3 * n // 8, 2] = rng.uniform(0.7, 1.0, n // 8)
    return U


def _assert_exact(fit, U):
    sparse, dense = fit(U), fit.loss_dense(U)
    assert np.all(np.isfinite(dense))
    np.testing.assert_allclose(sparse, dense, rtol=1e-9, atol=0)


def _real_windows(shared_data) -> list:
    """The ten IRAS 16293-2422 B windows of ../shared/data as problem.Window objects."""
    folder = shared_data / "spectra" / "iras16293b"
    wins = []
    with open(folder / "windows.csv") as fh:
        for row in csv.DictReader(fh):
            f, T = np.loadtxt(folder / f"spw{row['spw']}.dat", unpack=True)
            wins.append(problem.Window(f, T, float(row["rms_K"]), float(row["T_bg_K"]),
                                       float(row["beam_fwhm_arcsec"])))  # fmt: skip
    return wins


@pytest.mark.parametrize("loss", ["pm", "chi2"])
def test_loss_on_touched_channels_equals_dense_on_real_windows(loss, shared_data):
    wins = _real_windows(shared_data)
    mol = lte.load_molecule("CH3OH")
    box = problem.make_box(["CH3OH"])
    fit = problem.Problem(wins[:4], [mol], box, loss=loss, v_lsr_kms=2.7)
    rng = np.random.default_rng(1)
    _assert_exact(fit, _box_points(rng, box, 64))
    near = problem.to_unit(np.array([[0.5, 150.0, 1e17, 0.7, -0.1]]), box)  # the real lines
    _assert_exact(fit, np.clip(near + rng.normal(0, 0.01, (16, 5)), 0, 1))


@pytest.mark.parametrize("loss", ["pm", "chi2"])
def test_loss_on_touched_channels_equals_dense_for_two_molecules_and_edges(loss):
    ch3oh = lte.load_molecule("CH3OH")
    sio = lte.load_molecule("SiO")
    # A window ending 1 MHz below the CH3OH line at 241791.35 MHz (the line lies just outside),
    # a second window around SiO 5-4 (217104.98 MHz), and a strong line in each.
    f1 = np.linspace(241700.0, 241790.3, 700)
    f2 = np.linspace(217080.0, 217130.0, 400)
    rng = np.random.default_rng(2)
    truth = np.array([[0.8, 120.0, 1e17, 3.0, 0.5, 0.6, 60.0, 1e14, 2.0, -1.0]])
    box = problem.make_box(["CH3OH", "SiO"])
    exact = problem.Problem([problem.Window(f1, 0 * f1, 0.1), problem.Window(f2, 0 * f2, 0.1)],
                            [ch3oh, sio], box)  # fmt: skip
    T1, T2 = exact.model(truth)
    wins = [problem.Window(f1, T1[0] + rng.normal(0, 0.1, f1.size), 0.1, 2.0),
            problem.Window(f2[::-1], (T2[0] + rng.normal(0, 0.1, f2.size))[::-1], 0.1)]  # fmt: skip
    fit = problem.Problem(wins, [ch3oh, sio], box, loss=loss)
    U = _box_points(rng, box, 48)
    U[:8, 4] = problem.to_unit(truth, box)[0, 4] + rng.uniform(-0.01, 0.01, 8)  # v_off near
    _assert_exact(fit, U)
    assert fit.nfev == 2 * 48


def test_problem_refuses_bad_windows():
    mol = lte.load_molecule("CH3OH")
    box = problem.make_box(["CH3OH"])
    f = np.linspace(241700.0, 241800.0, 100)
    with pytest.raises(ValueError, match="rms <= 0"):
        problem.Problem([problem.Window(f, 0 * f, 0.0)], [mol], box)
    with pytest.raises(ValueError, match="non-finite"):
        problem.Problem([problem.Window(f, np.where(f > 241750, np.nan, 0.0), 0.1)], [mol], box)
    with pytest.raises(ValueError, match="no line within"):
        problem.Problem([problem.Window(f, 0 * f, 0.1)], [lte.load_molecule("SiO")], box)
    with pytest.raises(ValueError, match="no spectral window"):
        problem.Problem([], [mol], box)
    with pytest.raises(ValueError, match="loss"):
        problem.Problem([problem.Window(f, 0 * f, 0.1)], [mol], box, loss="l2")


def _assert_chi2_x_exact(fit, X):
    n0 = fit.nfev
    sparse, dense = fit.chi2_x(X), np.sum(fit.resid_x(X) ** 2, axis=1)
    assert np.all(np.isfinite(dense)) and fit.nfev == n0  # not counted, as resid_x
    np.testing.assert_allclose(sparse, dense, rtol=1e-9, atol=0)


def _n_tot_scan(X, k=0):
    """X (5 k,) with molecule k's N_tot over detect_and_limit's scan: 0, then 1e6-1e22."""
    XB = np.tile(X, (18, 1))
    XB[:, 5 * k + 2] = np.r_[0.0, 10.0 ** np.arange(6.0, 23.0)]
    return XB


def test_chi2_on_touched_channels_equals_dense_on_real_windows(shared_data):
    wins = _real_windows(shared_data)
    mol = lte.load_molecule("CH3OH")
    box = problem.make_box(["CH3OH"])
    fit = problem.Problem(wins[:4], [mol], box, v_lsr_kms=2.7)
    rng = np.random.default_rng(5)
    _assert_chi2_x_exact(fit, problem.to_physical(_box_points(rng, box, 64), box))
    _assert_chi2_x_exact(fit, _n_tot_scan(np.array([0.5, 150.0, 1e17, 0.7, -0.1])))  # limits


def test_chi2_on_touched_channels_equals_dense_for_two_molecules_and_edges():
    ch3oh, sio = lte.load_molecule("CH3OH"), lte.load_molecule("SiO")
    # the CH3OH line at 241791.35 MHz lies 1 MHz above the first window (its wing reaches in),
    # SiO 5-4 (217104.98 MHz) inside the second, given in descending frequency
    f1, f2 = np.linspace(241700.0, 241790.3, 700), np.linspace(217080.0, 217130.0, 400)
    truth = np.array([0.8, 120.0, 1e17, 3.0, 0.5, 0.6, 60.0, 1e14, 2.0, -1.0])
    box = problem.make_box(["CH3OH", "SiO"])
    rng = np.random.default_rng(6)
    bare = [problem.Window(f1, 0 * f1, 0.1), problem.Window(f2, 0 * f2, 0.1)]
    T1, T2 = problem.Problem(bare, [ch3oh, sio], box).model(truth)  # lines in the data
    rms2 = rng.uniform(0.05, 0.2, f2.size)  # per channel
    wins = [problem.Window(f1, T1[0] + rng.normal(0, 0.1, f1.size), 0.1, 2.0),
            problem.Window(f2[::-1], (T2[0] + rng.normal(0, rms2))[::-1], rms2[::-1])]  # fmt: skip
    fit = problem.Problem(wins, [ch3oh, sio], box)
    _assert_chi2_x_exact(fit, problem.to_physical(_box_points(rng, box, 48), box))
    for k in (0, 1):
        _assert_chi2_x_exact(fit, _n_tot_scan(truth, k))
    far = truth.copy()
    far[4] = -12.0  # CH3OH 12 km/s further above the first window: its far wing at most
    _assert_chi2_x_exact(fit, _n_tot_scan(far))
    none = truth.copy()
    none[[2, 7]] = 0.0  # no molecule: the sum of (T_obs / rms)^2
    data = sum(((w.T_obs_K / w.rms_K) ** 2).sum() for w in wins)
    assert fit.chi2_x(none[None])[0] == pytest.approx(data, rel=1e-12)
