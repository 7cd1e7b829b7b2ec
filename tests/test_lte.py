"""Tests of lte.py: catalogues, the LTE model's physical limits, and its channel averaging."""

import gzip
import http.server
import platform
import sys
import threading
from functools import partial

import numpy as np
import pytest

import catalogs
import lte

C_KMS = lte.C_KMS


def one_line(freq_MHz=230000.0, A_s=1e-4, g_u=10.0, E_low_K=10.0):
    """A molecule with one transition and Q(T) = T (linear rotor-like), for exact checks."""
    T = np.array([2.725, 10.0, 100.0, 1000.0])
    return lte.make_molecule("X", [freq_MHz], [A_s], [g_u], [E_low_K], T, np.log10(T))


def window(centre_MHz=230000.0, n_chan=200, dnu_MHz=0.1):
    return centre_MHz + dnu_MHz * (np.arange(n_chan) - n_chan / 2)


def brute_force(freq_MHz, mol, p, n_sub=400, T_bg_K=0.0, cmb=True):
    """Channel average of the intensity over n_sub points per channel (the definition)."""
    edges = lte._channel_edges(np.sort(freq_MHz))
    x = edges[:-1, None] + np.diff(edges)[:, None] * (np.arange(n_sub) + 0.5) / n_sub
    eta, T_ex, N, fwhm, v = p
    Q = mol.Q(T_ex)
    nu = mol.freq_MHz
    boltz = np.exp(-mol.E_low_K / T_ex) * -np.expm1(-lte.H_OVER_K_K_PER_MHZ * nu / T_ex)
    tau_int = lte.C2_OVER_8PI * N * mol.A_s * mol.g_u * boltz / (Q * nu**2)
    mu = nu * (1 - v / C_KMS)
    sig = fwhm / lte.FWHM_PER_SIGMA * mu / C_KMS
    tau = np.zeros_like(x)
    for t, m, s in zip(tau_int, mu, sig):
        tau += t * np.exp(-0.5 * ((x - m) / s) ** 2) / (np.sqrt(2 * np.pi) * s)
    dJ = lte.planck_J_K(np, x, T_ex) - cmb * lte.planck_J_K(np, x, lte.T_CMB_K) - T_bg_K
    return (eta * dJ * -np.expm1(-tau)).mean(1)


def N_for_peak_tau(mol, tau0, T_ex, fwhm_kms):
    """Column density giving peak opacity tau0 for the single line of `mol`."""
    p = np.array([[1.0, T_ex, 1e14, fwhm_kms, 0.0]])
    nu = mol.freq_MHz[0]
    boltz = np.exp(-mol.E_low_K[0] / T_ex) * -np.expm1(-lte.H_OVER_K_K_PER_MHZ * nu / T_ex)
    tau_int = lte.C2_OVER_8PI * 1e14 * mol.A_s[0] * mol.g_u[0] * boltz / (mol.Q(T_ex) * nu**2)
    sigma = fwhm_kms / lte.FWHM_PER_SIGMA * nu / C_KMS
    return p[0, 2] * tau0 / (tau_int / (np.sqrt(2 * np.pi) * sigma))


# --- accuracy of the channel average (docs/method.md §2: 1e-3 of the peak) ---


@pytest.mark.parametrize("fwhm_chan", [0.5, 1.0, 3.0, 10.0, 50.0])
@pytest.mark.parametrize("tau0", [0.01, 1.0, 10.0, 100.0])
def test_channel_average_matches_brute_force(fwhm_chan, tau0):
    mol = one_line()
    dnu = 0.1
    f = window(n_chan=400 if fwhm_chan < 20 else 1200, dnu_MHz=dnu)
    fwhm_kms = fwhm_chan * dnu / 230000.0 * C_KMS
    N = N_for_peak_tau(mol, tau0, 50.0, fwhm_kms)
    for v_off in (0.0, 0.37 * dnu / 230000.0 * C_KMS):  # centred and off-centre in a channel
        p = np.array([0.8, 50.0, N, fwhm_kms, v_off])
        model = lte.spectrum(f, mol, p[None])[0]
        ref = brute_force(f, mol, p)
        assert np.abs(model - ref).max() <= 1e-3 * np.abs(ref).max()


def test_reference_spectrum_is_the_brute_force_definition():
    mol = one_line()
    f = window(n_chan=300)
    p = np.array([0.7, 40.0, N_for_peak_tau(mol, 3.0, 40.0, 0.5), 0.5, 0.2])
    ref = lte.reference_spectrum(f, mol, p, T_bg_K=1.5, n_sub=200)
    assert ref.max() > 5.0
    np.testing.assert_allclose(ref, brute_force(f, mol, p, n_sub=200, T_bg_K=1.5), atol=1e-12)
    assert np.abs(lte.spectrum(f, mol, p[None], T_bg_K=1.5)[0] - ref).max() < 1e-3 * ref.max()


def test_line_centre_outside_window_still_contributes_wings():
    mol = one_line()
    f = window(n_chan=100, dnu_MHz=0.1)
    fwhm_kms = 20 * 0.1 / 230000.0 * C_KMS  # 20 channels wide
    v_off = -(5.5 + 6 * 0.1) / 230000.0 * C_KMS  # centre 0.6 MHz above the top edge
    p = np.array([0.5, 30.0, N_for_peak_tau(mol, 100.0, 30.0, fwhm_kms), fwhm_kms, v_off])
    model = lte.spectrum(f, mol, p[None])[0]
    ref = brute_force(f, mol, p)
    assert ref.max() > 1.0  # the wing is bright inside the window
    assert np.abs(model - ref).max() <= 1e-3 * ref.max()


def test_descending_frequencies_give_the_reversed_spectrum():
    mol = one_line()
    f = window()
    p = np.array([[0.5, 30.0, 1e15, 1.0, 0.3]])
    assert np.allclose(lte.spectrum(f[::-1], mol, p)[0], lte.spectrum(f, mol, p)[0][::-1])


def test_batch_shape_and_batched_equals_single():
    mol = one_line()
    f = window()
    rng = np.random.default_rng(1)
    p = np.c_[rng.uniform(0.1, 0.9, 6), rng.uniform(10, 300, 6), 10 ** rng.uniform(13, 17, 6),
              rng.uniform(0.1, 5, 6), rng.uniform(-5, 5, 6)].reshape(2, 3, 5)  # fmt: skip
    out = lte.spectrum(f, mol, p)
    assert out.shape == (2, 3, f.size)
    for i in range(2):
        for j in range(3):
            single = lte.spectrum(f, mol, p[i, j][None])[0]
            assert np.allclose(out[i, j], single, rtol=0, atol=1e-6 * np.abs(single).max())


# --- physical limits ---


def test_optically_thin_integrated_line_is_linear_in_N():
    mol = one_line()
    f = window(n_chan=400)
    p = np.array([[0.5, 40.0, 1e10, 2.0, 0.0], [0.5, 40.0, 3e10, 2.0, 0.0]])
    area = lte.spectrum(f, mol, p).sum(-1)
    assert area[0] > 0
    assert area[1] / area[0] == pytest.approx(3.0, rel=1e-4)


@pytest.mark.parametrize("T_bg_K", [0.0, 5.0])
def test_optically_thick_peak_saturates(T_bg_K):
    mol = one_line()
    f = window(n_chan=400)
    T_ex, eta = 80.0, 0.6
    p = np.array([[eta, T_ex, 1e22, 10.0, 0.0]])
    peak = lte.spectrum(f, mol, p, T_bg_K=T_bg_K)[0].max()
    nu = 230000.0
    expect = eta * (lte.planck_J_K(np, nu, T_ex) - lte.planck_J_K(np, nu, lte.T_CMB_K) - T_bg_K)
    assert peak == pytest.approx(expect, rel=1e-4)


@pytest.mark.parametrize("N_cm2", [1e13, 1e14, 1e15])
def test_peak_opacity_inverts_the_line_centre_brightness(N_cm2):
    """At the centre of a resolved line T = eta dJ (1 - exp(-tau_0)), so tau_0 follows from the
    model's own peak: an independent route to the opacity."""
    mol = one_line()
    f = window(n_chan=2000, dnu_MHz=0.002)  # 0.0026 km/s channels: no channel averaging
    p = np.array([0.5, 30.0, N_cm2, 1.0, 0.0])
    peak = lte.spectrum(f, mol, p[None], cmb=False)[0].max()
    tau_0 = -np.log(1 - peak / (p[0] * lte.planck_J_K(np, 230000.0, p[1])))
    assert lte.peak_opacity(f, mol, p) == pytest.approx(tau_0, rel=1e-4)
    assert 0.05 < tau_0 < 7  # the cases span thin (0.06) to thick (6)
    assert lte.peak_opacity(f, mol, p + [0, 0, 0, 0, 9.0]) == 0  # the centre left the window


def test_zero_column_density_gives_zeros():
    f = window()
    assert not lte.spectrum(f, one_line(), np.array([[0.5, 40.0, 0.0, 2.0, 0.0]])).any()


def test_cmb_switch_changes_only_the_background_term():
    mol = one_line()
    f = window()
    p = np.array([[1.0, 10.0, 1e22, 10.0, 0.0]])
    with_cmb = lte.spectrum(f, mol, p)[0][100]  # f[100] = 230000 MHz, on the saturated top
    without = lte.spectrum(f, mol, p, cmb=False)[0][100]
    assert without - with_cmb == pytest.approx(lte.planck_J_K(np, 230000.0, lte.T_CMB_K), rel=1e-4)


# --- bad input ---


@pytest.mark.parametrize(
    "bad, word",
    [([np.nan, 40, 1e15, 1, 0], "eta"), ([0.5, -1, 1e15, 1, 0], "T_ex"),
     ([0.5, 40, -1, 1, 0], "N_tot"), ([0.5, 40, 1e15, 0, 0], "fwhm"),
     ([0.5, 40, 1e15, 1], "shape")],
)  # fmt: skip
def test_bad_params_raise_naming_the_value(bad, word):
    with pytest.raises(ValueError, match=word):
        lte.spectrum(window(), one_line(), np.array([bad], dtype=float))


def test_bad_frequencies_raise():
    p = np.array([[0.5, 40, 1e15, 1, 0]])
    with pytest.raises(ValueError, match="non-empty"):
        lte.spectrum(np.array([]), one_line(), p)
    with pytest.raises(ValueError, match="at least 2 channels"):
        lte.spectrum(np.array([230000.0]), one_line(), p)


# --- catalogues ---


def test_bundled_ch3oh_line_and_partition_function():
    mol = lte.load_molecule("CH3OH")
    i = np.argmin(np.abs(mol.freq_MHz - 241791.35))
    assert mol.freq_MHz[i] == pytest.approx(241791.35, abs=0.01)
    assert mol.A_s[i] == pytest.approx(6.04e-5, rel=0.01)  # CDMS: 5(0)-4(0) A+
    assert mol.g_u[i] == 44
    assert mol.E_up_K[i] == pytest.approx(34.8, abs=0.1)
    assert mol.Q(300.0) == pytest.approx(10**4.5685, rel=1e-9)  # cdms_partfunc.cat, tag 32504


def test_partition_function_log_log_interpolation_and_extrapolation():
    mol = one_line()  # Q = T exactly on the table, so log-log interpolation is exact
    assert mol.Q(np.array([3.0, 50.0, 500.0])) == pytest.approx([3.0, 50.0, 500.0], rel=1e-12)
    assert mol.Q(2000.0) == pytest.approx(2000.0, rel=1e-12)  # end slope, not held constant


def test_co_from_cat_and_from_xclass_agree(shared_data):
    cat = shared_data / "catalogs" / "cdms_jpl" / "github_pyspeckit_tests" / "co.cat"
    db = shared_data / "catalogs" / "xclass_format_fixture.sqlite"
    a = lte.load_molecule(cat)
    b = lte.load_molecule("CO;v=0;", catalog=db)
    assert a.freq_MHz.size == b.freq_MHz.size == 95
    assert np.allclose(a.freq_MHz, b.freq_MHz, rtol=1e-9)
    assert np.allclose(a.A_s, b.A_s, rtol=0.01)
    assert np.allclose(a.g_u, b.g_u)


def test_xclass_fixture_loads_and_joins_states(shared_data):
    db = shared_data / "catalogs" / "xclass_format_fixture.sqlite"
    v0 = lte.load_molecule("CH3OH;v=0;", catalog=db)
    allv = lte.load_molecule("CH3OH", catalog=db)
    assert v0.freq_MHz.size == 12575
    assert allv.freq_MHz.size == 12575 + 10596 + 6737
    assert np.all(np.diff(allv.freq_MHz) >= 0)
    with pytest.raises(ValueError, match="closest names"):
        lte.load_molecule("CH3OHH", catalog=db)


def test_folder_catalogue_pairs_each_cat_with_its_own_q(shared_data):
    folder = shared_data / "catalogs" / "cdms_jpl" / "github_madcuba_subsets"
    mol = lte.load_molecule("CH3OCHO", catalog=folder)
    assert mol.freq_MHz.size == 1317
    assert mol.Q(300.0) == pytest.approx(10**5.3002, rel=1e-3)  # q_060003 (JPL), not CDMS


def test_letter_coded_gup_and_bad_line(tmp_path):
    line = "  230000.0000  0.0010 -3.0000 3   10.0000A23 -99501 101 1           0\n"
    cat = tmp_path / "c099501.cat"
    cat.write_text(line)
    assert catalogs.read_cat(cat)["g_u"][0] == 1023
    (tmp_path / "bad.cat").write_text(line + "garbage line that is not a catalogue row\n")
    with pytest.raises(ValueError, match=r"bad\.cat:2"):
        catalogs.read_cat(tmp_path / "bad.cat")


def test_unknown_name_lists_closest():
    with pytest.raises(ValueError, match="CH3OH"):
        lte.load_molecule("CH3OHX")


def test_missing_catalog_and_bad_range(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lte.load_molecule("CH3OH", catalog=tmp_path / "nope")
    with pytest.raises(ValueError, match="lo < hi"):
        lte.load_molecule("CH3OH", freq_range_MHz=(5.0, 1.0))


# --- fetch against a local HTTP server ---


@pytest.fixture
def local_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_downloads_and_name_resolves(local_server, tmp_path, monkeypatch):
    root, url = local_server
    with gzip.open(catalogs.DATA_DIR / "c044505.cat.gz", "rb") as src:
        (root / "c044505.cat").write_bytes(src.read())
    cache = tmp_path / "cache"
    path = catalogs.fetch("44505", cache=cache, cdms_url=url, jpl_url=url)
    index = (cache / "index.json").read_text()
    assert path.exists() and "sha256" in index and url in index
    monkeypatch.setattr(catalogs, "DATA_DIR", tmp_path / "empty")  # resolve from the cache alone
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(catalogs, "CACHE_DIR", cache)
    mol = lte.load_molecule("44505")
    assert mol.freq_MHz.size > 0 and np.isfinite(mol.Q(100.0))


def test_fetch_offline_fails_at_once(tmp_path):
    with pytest.raises(ConnectionError, match="cannot download"):
        catalogs.fetch("44505", cache=tmp_path, cdms_url="http://127.0.0.1:9/", timeout_s=2)
    assert not any(tmp_path.iterdir())


def test_cli_info_and_error(capsys):
    assert catalogs.main(["info", "CH3OH", "--freq", "232000:233000"]) == 0
    assert "lines=" in capsys.readouterr().out
    assert catalogs.main(["info", "NOPE_MOLECULE"]) == 2
    assert "error:" in capsys.readouterr().err


def test_batch_of_mixed_plans_equals_single_rows_for_many_lines():
    """Rows with different sub-channel plans (narrow / broad, thin / thick lines) and lines that
    reach the window in some rows only: each row of the batch is the row computed alone."""
    mol = lte.load_molecule("CH3OH")
    f = np.arange(241000.0, 241300.0, 0.122)
    p = np.array([[0.5, 150.0, 1e16, 1.0, 0.0], [0.9, 30.0, 1e19, 0.3, -12.0],
                  [0.2, 300.0, 1e14, 30.0, 12.0], [1.0, 80.0, 1e18, 5.0, 3.3]])  # fmt: skip
    layout = lte.line_layout(f, mol, p)
    assert len(set(zip(layout["n_sub"], layout["K"]))) >= 3  # the rows are in different groups
    out = lte.spectrum(f, mol, p)
    for row, q in zip(out, p):
        single = lte.spectrum(f, mol, q[None])[0]
        assert np.abs(row - single).max() <= 1e-12 * np.abs(single).max()


NOT_GLIBC = sys.platform != "linux" or platform.libc_ver()[0] != "glibc"


@pytest.mark.skipif(NOT_GLIBC, reason="mallopt is glibc's; elsewhere keep_freed_memory is a no-op")
def test_keep_freed_memory_sets_glibc_malloc_thresholds():
    assert lte.keep_freed_memory() is True
