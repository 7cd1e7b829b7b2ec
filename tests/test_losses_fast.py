"""The one-row path of pm_on (issue 10: SLSQP's single points in python floats) gives the numbers
of the batched path bit for bit, on random models and on the fitting problem's own models."""

import csv

import numpy as np

import losses
import lte
import problem


def _real_windows(shared_data, n) -> list:
    """The first n IRAS 16293-2422 B windows of ../shared/data (as in test_problem)."""
    folder = shared_data / "spectra" / "iras16293b"
    with open(folder / "windows.csv") as fh:
        rows = list(csv.DictReader(fh))[:n]
    return [problem.Window(*np.loadtxt(folder / f"spw{r['spw']}.dat", unpack=True),
                           float(r["rms_K"]), float(r["T_bg_K"]), float(r["beam_fwhm_arcsec"]))
            for r in rows]  # fmt: skip


def _one_and_batched(T, idx, win, exact_row):
    """pm_on of the row T (n,) alone (the one-row path) and beside a zero row (the batched path
    with one row searched: a zero row has no peak)."""
    one = losses.pm_on(T[None], idx, win, exact_row)[0]
    batched = losses.pm_on(np.vstack([T, 0 * T]), idx, win, exact_row)[0]
    return one, batched


def _random_case(rng, C=400):
    """An observed window with emission and absorption lines and a model that is 0 off a few
    runs of channels (one 0 channel at each end of each run), positive and negative lines."""
    x = np.arange(C, dtype=float)
    lines = lambda n, amp: sum(rng.uniform(*amp) * np.exp(-0.5 * ((x - rng.uniform(0, C)) /  # noqa: E731
                               rng.uniform(0.7, 8.0)) ** 2) for _ in range(n))  # fmt: skip
    T_obs = lines(6, (-1.0, 3.0)) + rng.normal(0, 0.1, C)
    T_full = np.zeros(C)
    for lo in rng.choice(np.arange(5, C - 60, 60), int(rng.integers(1, 5)), replace=False):
        width = int(rng.integers(3, 55))
        T_full[lo + 1 : lo + width] = lines(3, (-4.0, 4.0))[lo + 1 : lo + width]
    idx = np.flatnonzero(np.convolve(T_full != 0, [1, 1, 1], "same"))
    return T_obs, T_full, idx


def _crossing_case(rng, C=400):
    """A weak emission line between two deep absorptions in two runs: its 25 % level lies
    below 0, so its span reaches across the zeros into the other run (pm_on's exact_row)."""
    x = np.arange(C, dtype=float)
    g = lambda amp, x0, w: amp * np.exp(-0.5 * ((x - x0) / w) ** 2)  # noqa: E731
    T_full = g(-5.0, 120, 3) + g(0.8, 146, 1.5) + g(-5.0, 160, 3)
    T_full[(x < 105) | ((x > 135) & (x < 141)) | (x > 175)] = 0.0
    T_obs = g(1.0, rng.uniform(100, 200), 2.0) + rng.normal(0, 0.1, C)
    return T_obs, T_full, np.flatnonzero(np.convolve(T_full != 0, [1, 1, 1], "same"))


def test_one_row_path_is_the_batched_path_on_random_models():
    rng = np.random.default_rng(3)
    n_exact = n_peaks = 0
    for i in range(400):
        T_obs, T_full, idx = _random_case(rng) if i % 10 else _crossing_case(rng)
        if idx.size == 0:
            continue
        win = losses.window_constants(T_obs, 0.1)
        dense = losses.loss_pm(T_full, T_obs, 0.1, win["obs"])[0]
        calls = []
        exact_row = lambda b: calls.append(b) or dense  # noqa: E731
        one, batched = _one_and_batched(T_full[idx], idx, win, exact_row)
        assert one == batched  # bit for bit
        np.testing.assert_allclose(one, dense, rtol=1e-9, atol=0)
        n_exact += len(calls) > 0
        n_peaks += losses.find_spans(T_full, 0.1)[0].size > 0
    assert n_exact > 0 and n_peaks > 100  # both branches and many model peaks were reached


def test_one_row_path_is_the_batched_path_on_the_problem(shared_data):
    box = problem.make_box(["CH3OH"])
    fit = problem.Problem(_real_windows(shared_data, 4), [lte.load_molecule("CH3OH")], box,
                          v_lsr_kms=2.7)  # fmt: skip
    rng = np.random.default_rng(4)
    near = problem.to_unit(np.array([[0.5, 150.0, 1e17, 0.7, -0.1]]), box)  # the real lines
    U = np.vstack([rng.random((40, 5)), np.clip(near + rng.normal(0, 0.01, (24, 5)), 0, 1)])
    U[:8, 3], U[8:16, 3] = 1.0, 0.0  # the widest and the narrowest lines of the box
    X = problem.to_physical(U, box)
    for j, win in enumerate(fit.consts):
        idx, T = fit._model_on(X, j)
        for b in range(len(X)):
            exact_row = lambda _: fit._dense_loss(X[b : b + 1], j)[0]  # noqa: E731, B023
            one, batched = _one_and_batched(T[b], idx, win, exact_row)
            assert one == batched
    singles = np.concatenate([fit(U[b : b + 1]) for b in range(len(U))])
    np.testing.assert_allclose(singles, fit(U), rtol=1e-9, atol=0)  # batched: cumsums run on
