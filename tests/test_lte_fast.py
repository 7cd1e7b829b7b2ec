"""The one-row paths of the LTE kernel (issue 10: one spectrum at a time in python floats) give
the same numbers as the batched arrays, and the dense spectrum equals render on every channel."""

import numpy as np
import pytest

import catalogs
import lte
import subchannels


def _rows(rng, n):
    """n parameter sets over the fitting box: thin and thick, narrow and broad, shifted lines."""
    return np.column_stack([rng.uniform(0.05, 1.0, n), 10 ** rng.uniform(0.5, 3.0, n),
                            10 ** rng.uniform(12.0, 20.0, n), 10 ** rng.uniform(-1.0, 1.7, n),
                            rng.uniform(-20.0, 20.0, n)])  # fmt: skip


def test_plan_of_one_row_is_the_batched_plan():
    """plan's float path (one row) gives the n_sub, K and simpson of the array path."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        L = int(rng.integers(1, 40))
        s = 10 ** rng.uniform(-2.0, 2.0, (1, L))
        tau = 10 ** rng.uniform(-6.0, 4.0, (1, L)) * rng.choice([1e-3, 1.0])
        one = subchannels.plan(s, tau)
        two = subchannels.plan(np.repeat(s, 2, axis=0), np.repeat(tau, 2, axis=0))
        for a, b in zip(one, two):
            assert a.dtype == b.dtype and a.shape == (1,) and a[0] == b[0]


def test_log10_partition_of_one_temperature_is_the_array_value():
    mol = lte.load_molecule("CH3OH")
    T = np.concatenate([[1.0, 2.725, 9.375, 150.0, 300.0, 1e4], 10 ** np.linspace(0, 4, 97)])
    arrays = catalogs.log10_partition(np, T, mol.Q_T_K, mol.log10_Q)
    floats = [catalogs.log10_partition(np, float(t), mol.Q_T_K, mol.log10_Q) for t in T]
    assert np.array_equal(arrays, floats)


@pytest.mark.parametrize("descending", [False, True])
def test_one_row_spectrum_equals_its_batch_row_and_render_on_every_channel(descending):
    """lte.spectrum of one row (floats, the covering's runs) against the same row in a batch and
    against render on all channels (no runs, no shifts): equal to round-off (1e-12)."""
    mol = lte.load_molecule("CH3OH")
    f = np.arange(241000.0, 241400.0, 0.122)
    P = _rows(np.random.default_rng(1), 24)
    P[0] = [0.5, 150.0, 1e16, 1.0, 0.0]
    batch = lte.spectrum(f[::-1] if descending else f, mol, P)
    for p, row in zip(P, batch):
        one = lte.spectrum(f[::-1] if descending else f, mol, p[None])[0]
        full = lte.render(lte.line_layout(f, mol, p[None]))[0]
        scale = max(np.abs(one).max(), 1e-300)
        assert np.abs(row - one).max() <= 1e-12 * scale
        assert np.abs((full[::-1] if descending else full) - one).max() <= 1e-12 * scale


def test_render_on_every_channel_when_no_line_reaches():
    """Lines selected by the reach but touching no channel: zeros, also without channels."""
    mol = lte.load_molecule("CH3OH")
    f = np.array([241791.0, 241791.5])
    layout = lte.line_layout(f, mol, [[0.5, 150.0, 1e16, 0.1, 20.0]])
    assert layout["L"] == 0
    assert np.array_equal(lte.render(layout), np.zeros((1, 2)))
    assert np.array_equal(lte.spectrum(f, mol, [[0.5, 150.0, 1e16, 0.1, 20.0]]), np.zeros((1, 2)))


def test_non_finite_frequencies_raise():
    mol = lte.make_molecule("X", [230000.0], [1e-4], [10.0], [10.0], [10.0, 1000.0], [1.0, 3.0])
    p = np.array([[0.5, 40, 1e15, 1, 0]])
    f = 230000.0 + 0.1 * np.arange(50)
    for bad in (np.nan, np.inf, -np.inf):
        g = f.copy()
        g[7] = bad
        with pytest.raises(ValueError, match="finite"):
            lte.spectrum(g, mol, p)
