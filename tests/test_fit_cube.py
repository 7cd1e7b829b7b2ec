"""fit_cube.py: reading real and synthetic cubes, unit conversion, the fit end to end, workers,
resume, failures, Dask, the demo cube, and every error the module raises."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fit_cube  # noqa: E402
import lte  # noqa: E402
import spectuner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRUE = {  # (y, x) -> eta, T_ex, N_tot, delta_v, v_off of the tiny cube
    (0, 0): (0.8, 100.0, 3e16, 2.0, -1.0),
    (0, 1): (0.6, 150.0, 1e16, 3.0, 0.5),
    (1, 0): (0.9, 180.0, 5e16, 2.5, 1.0),
    (1, 1): (0.7, 120.0, 2e16, 2.0, 0.0),
    (1, 2): (0.5, 90.0, 1e16, 3.5, -0.5),
    (2, 0): (0.8, 200.0, 4e16, 3.0, 0.8),
    (2, 1): (0.7, 140.0, 2e16, 2.5, -0.8),
}  # (0, 2) holds noise only (few_peaks), (2, 2) is blank (NaN)
FREQ_HZ = 241.700e9 + 0.5e6 * np.arange(300)
RMS_K = 0.1


def header_3d(n_chan, ny, nx, **spectral):
    """RA/DEC/spectral header; the spectral keywords default to a FREQ axis of FREQ_HZ."""
    h = fits.Header()
    h.update(CTYPE1="RA---SIN", CRVAL1=10.0, CDELT1=-1e-4, CRPIX1=1.0, CUNIT1="deg")
    h.update(CTYPE2="DEC--SIN", CRVAL2=-20.0, CDELT2=1e-4, CRPIX2=1.0, CUNIT2="deg")
    h.update(CTYPE3="FREQ", CRVAL3=FREQ_HZ[0], CDELT3=0.5e6, CRPIX3=1.0, CUNIT3="Hz", BUNIT="K")
    h.update(spectral)
    return h


def write(path, data, header, extra=()):
    """Write data with header (plus extra HDUs) and return the path as str."""
    fits.HDUList([fits.PrimaryHDU(np.asarray(data, dtype=np.float32), header), *extra]).writeto(
        path, overwrite=True
    )
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3x3x300 K cube of CH3OH made with lte.spectrum, 0.1 K noise, a 6-channel blank run."""
    folder = tmp_path_factory.mktemp("tiny")
    mol = lte.load_molecule("CH3OH", freq_range_MHz=(241500.0, 242100.0))
    rng = np.random.default_rng(1)
    data = rng.normal(0.0, RMS_K, (300, 3, 3))
    for (y, x), p in TRUE.items():
        data[:, y, x] += lte.spectrum(FREQ_HZ / 1e6, mol, np.array([p]))[0]
    data[:, 2, 2] = np.nan
    data[140:146] = np.nan
    return write(folder / "tiny.fits", data, header_3d(300, 3, 3))


def config(cube, out, **kw):
    """A fast Config for the tiny cube: chi2, 20 starts, quiet."""
    base = fit_cube.Config(cube=cube, mol=["CH3OH"], out=str(out), loss="chi2", n_init=20,
                           workers=1, quiet=True, flush_every=2)  # fmt: skip
    return replace(base, **kw)


def read_maps(out):
    """Every FITS output in out as {file name: array}."""
    return {p.name: fits.getdata(p) for p in sorted(Path(out).glob("*.fits"))}


def assert_same_maps(a, b):
    """Two runs wrote the same files with bit-identical arrays (NaN = NaN)."""
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name], equal_nan=True), name


@pytest.fixture(scope="module")
def run1(tiny, tmp_path_factory):
    """The tiny cube fitted in-process (--workers 1): (out folder, summary)."""
    out = tmp_path_factory.mktemp("run1")
    return out, fit_cube.main(config(tiny, out))


# --- reading ---


def test_real_cubes_read_and_convert(shared_data):
    hcn = fit_cube.read_cube(str(shared_data / "fits" / "region5_hcn_crop.fits"))
    assert hcn["data"].shape == (352, 37, 47) and hcn["unit"] == "K"
    assert np.all(hcn["K_per_unit"] == 1.0) and hcn["specsys"] == "LSRK"
    step = np.diff(hcn["freq_MHz"])
    assert (step > 0).all() and hcn["descending"]  # VRAD increasing -> frequency decreasing
    assert abs(np.median(hcn["freq_MHz"]) - 88631.8) < 10  # HCN 1-0 around its rest frequency
    assert np.isfinite(hcn["data"]).mean() > 0.5 and np.nanmax(hcn["data"]) > 0.5
    ccs = fit_cube.read_cube(str(shared_data / "fits" / "CCS.fits"))
    assert ccs["data"].shape == (421, 25, 29) and ccs["unit"] == "Jy/beam"  # BUNIT 'Jy' per beam
    theta = 0.00939475421656 * 3600
    expect = 1.222e6 / ((ccs["freq_MHz"] / 1e3) ** 2 * theta**2)
    assert np.allclose(ccs["K_per_unit"], expect) and np.isfinite(ccs["K_per_unit"]).all()
    assert abs(np.median(ccs["freq_MHz"]) - 22344.0) < 5
    assert ccs["wcs2d"]["WCSAXES"] == 2 and ccs["wcs2d"]["CTYPE2"] == "DEC--TAN"


def test_velocity_axis_equals_freq_axis(tmp_path):
    f0, dv = 241.8e9, -620.0  # m/s: negative CDELT, reference pixel in the middle
    vel = header_3d(50, 2, 2, CTYPE3="VRAD", CRVAL3=3000.0, CDELT3=dv, CRPIX3=25.0, CUNIT3="m/s",
                    RESTFRQ=f0, SPECSYS="LSRK")  # fmt: skip
    freq = header_3d(50, 2, 2, CRVAL3=f0 * (1 - 3000.0 / fit_cube.C_MS), CRPIX3=25.0,
                     CDELT3=-f0 * dv / fit_cube.C_MS)  # fmt: skip
    data = np.zeros((50, 2, 2))
    a = fit_cube.read_cube(write(tmp_path / "v.fits", data, vel))["freq_MHz"]
    b = fit_cube.read_cube(write(tmp_path / "f.fits", data, freq))["freq_MHz"]
    assert np.allclose(a, b, rtol=1e-12, atol=0) and a[1] > a[0]
    kms = header_3d(50, 2, 2, CTYPE3="VRAD", CRVAL3=3.0, CDELT3=dv / 1e3, CRPIX3=25.0,
                    CUNIT3="km/s", RESTFRQ=f0)  # fmt: skip
    c = fit_cube.read_cube(write(tmp_path / "k.fits", data, kms))["freq_MHz"]
    assert np.allclose(c, a, rtol=1e-12, atol=0)
    opt = header_3d(50, 2, 2, CTYPE3="VOPT", CRVAL3=3000.0, CDELT3=dv, CRPIX3=25.0,
                    CUNIT3="m/s", RESTFRQ=f0)  # fmt: skip
    v = 3000.0 + dv * (np.arange(50) - 24)
    d = fit_cube.read_cube(write(tmp_path / "o.fits", data, opt))["freq_MHz"]
    assert np.allclose(d, f0 / (1 + v / fit_cube.C_MS) / 1e6, rtol=1e-12, atol=0)


def test_stokes_axis_and_axis_order(tmp_path):
    rng = np.random.default_rng(0)
    cube = rng.normal(size=(20, 3, 4))  # (C, Y, X)
    h = header_3d(20, 3, 4)
    h.update(CTYPE4="STOKES", CRVAL4=1.0, CDELT4=1.0, CRPIX4=1.0)
    a = fit_cube.read_cube(write(tmp_path / "s.fits", cube[None], h))
    assert np.array_equal(a["data"], cube.astype(np.float32)) and len(a["shape"]) == 4
    swapped = fits.Header()  # spectral axis first in FITS order: numpy (DEC, RA, FREQ)
    for new, old in ((1, 3), (2, 1), (3, 2)):
        for key in ("CTYPE", "CRVAL", "CDELT", "CRPIX", "CUNIT"):
            swapped[f"{key}{new}"] = h[f"{key}{old}"]
    swapped["BUNIT"] = "K"
    b = fit_cube.read_cube(write(tmp_path / "t.fits", cube.transpose(1, 2, 0), swapped))
    assert np.array_equal(b["data"], a["data"]) and np.array_equal(b["freq_MHz"], a["freq_MHz"])


def test_jy_per_beam_to_K_and_beams_table(tmp_path):
    h = header_3d(10, 2, 2, BUNIT="Jy/beam", BMAJ=0.5 / 3600, BMIN=0.3 / 3600, BPA=0.0)
    a = fit_cube.read_cube(write(tmp_path / "j.fits", np.ones((10, 2, 2)), h))
    nu = FREQ_HZ[:10] * u.Hz
    area = np.pi * (0.5 * u.arcsec) * (0.3 * u.arcsec) / (4 * np.log(2))  # Gaussian beam
    expect = (1 * u.Jy / u.beam).to(u.K, u.brightness_temperature(nu, area)).value
    assert np.allclose(a["K_per_unit"], expect, rtol=1e-3)  # the 1.222e6 rounding
    deg_form = 94299.4 / (
        (nu.value / 1e6) ** 2 * h["BMAJ"] * h["BMIN"]
    )  # docs/method.md §9, to 1e-4
    assert np.allclose(a["K_per_unit"], deg_form, rtol=2e-4)
    assert fit_cube.read_cube(write(tmp_path / "m.fits", np.ones((10, 2, 2)),
                              header_3d(10, 2, 2, BUNIT="mJy/beam", BMAJ=h["BMAJ"],
                                        BMIN=h["BMIN"])))["K_per_unit"][0] == pytest.approx(
        a["K_per_unit"][0] / 1e3)  # fmt: skip
    bmaj = np.linspace(0.4, 0.6, 10)  # arcsec, one beam per channel, two polarisations
    table = fits.BinTableHDU.from_columns([
        fits.Column("BMAJ", "E", unit="arcsec", array=np.r_[bmaj, bmaj * 2]),
        fits.Column("BMIN", "E", unit="arcsec", array=np.full(20, 0.3)),
        fits.Column("BPA", "E", unit="deg", array=np.zeros(20)),
        fits.Column("CHAN", "J", array=np.r_[np.arange(10)[::-1], np.arange(10)]),
        fits.Column("POL", "J", array=np.r_[np.zeros(10), np.ones(10)]),
    ], name="BEAMS")  # fmt: skip
    table.data["BMAJ"][:10] = bmaj[::-1]  # rows in reverse channel order
    b = fit_cube.read_cube(write(tmp_path / "b.fits", np.ones((10, 2, 2)), h, [table]))
    assert np.allclose(b["beam_arcsec"][:, 0], bmaj, rtol=1e-6)
    assert np.allclose(b["K_per_unit"], expect * 0.5 / bmaj, rtol=1e-3)
    table.data["CHAN"][9], table.data["POL"][9] = 5, 1  # one channel short for POL 0
    with pytest.raises(ValueError, match="BEAMS table has 9 beams"):
        fit_cube.read_cube(write(tmp_path / "c.fits", np.ones((10, 2, 2)), h, [table]))


def test_reading_errors(tmp_path):
    data = np.zeros((10, 2, 2))
    cases = [
        (dict(), np.zeros((2, 2)), "no image HDU"),
        (dict(CTYPE3="LINEAR"), data, "no spectral axis"),
        (dict(CTYPE3="VRAD", CUNIT3="m/s", CRVAL3=0.0, CDELT3=100.0), data, "needs RESTFRQ"),
        (dict(CTYPE3="WAVN", CUNIT3="m-1", CRVAL3=800.0, CDELT3=1.0), data, "expected one of"),
        (dict(BUNIT="erg/s"), data, "BUNIT 'erg/s' unknown"),
        (dict(BUNIT="Jy/beam"), data, "no BMAJ/BMIN"),
        (dict(), np.zeros((1, 2, 2)), "not strictly monotonic"),
    ]
    for i, (keys, arr, match) in enumerate(cases):
        path = write(tmp_path / f"e{i}.fits", arr, header_3d(10, 2, 2, **keys))
        with pytest.raises(ValueError, match=match):
            fit_cube.read_cube(path)
    h = header_3d(10, 2, 2, CTYPE2="STOKES", CRVAL2=1.0, CDELT2=1.0, CUNIT2="")
    with pytest.raises(ValueError, match="invalid WCS"):  # RA without DEC
        fit_cube.read_cube(write(tmp_path / "sp.fits", data, h))
    h.update(CTYPE1="X", CUNIT1="")
    with pytest.raises(ValueError, match="expected 2 spatial axes"):
        fit_cube.read_cube(write(tmp_path / "sx.fits", data, h))
    h = header_3d(10, 2, 2, CTYPE4="STOKES", CRVAL4=1.0, CDELT4=1.0, CRPIX4=1.0)
    with pytest.raises(ValueError, match="not of size 1"):
        fit_cube.read_cube(write(tmp_path / "st.fits", np.zeros((4, 10, 2, 2)), h))
    with pytest.raises(FileNotFoundError):
        fit_cube.read_cube(str(tmp_path / "missing.fits"))
    with pytest.raises(ValueError, match="--region"):
        fit_cube.parse_region("1:1,0:2", (2, 2))
    with pytest.raises(ValueError, match="--region"):
        fit_cube.parse_region("a box", (2, 2))
    with pytest.raises(FileNotFoundError):
        fit_cube.read_plane(str(tmp_path / "none.fits"), (2, 2), "mask")
    with pytest.raises(ValueError, match="has shape"):
        fit_cube.read_plane(
            write(tmp_path / "p.fits", np.zeros((3, 2)), fits.Header()), (2, 2), "mask"
        )


# --- fitting end to end ---


def test_tiny_cube_recovers_injected_parameters(tiny, run1):
    out, summary = run1
    status = fits.getdata(out / "status.fits")
    assert status[2, 2] == 2 and status[0, 2] == 8  # blank pixel; noise only: a limit
    assert summary["counts"]["fitted"] == 7 and summary["complete"]
    maps = {p: fits.getdata(out / f"CH3OH_{p}.fits") for p in spectuner.PARAM_NAMES}
    for (y, x), (eta, T_ex, N, dv, v_off) in TRUE.items():
        # Peaks are 3-40 K against 0.1 K noise over 5-15 lines: the fit errors are ~1 % in T_ex,
        # dv and eta*N and 0.02 km/s in v_off; the tolerances allow for a few times that and for
        # eta and N alone being degenerate where the lines are thin (only eta*N is constrained).
        assert maps["T_ex"][y, x] == pytest.approx(T_ex, rel=0.1)
        assert maps["delta_v"][y, x] == pytest.approx(dv, rel=0.1)
        assert maps["v_off"][y, x] == pytest.approx(v_off, abs=0.1)
        assert maps["eta"][y, x] * maps["N_tot"][y, x] == pytest.approx(eta * N, rel=0.15)
    assert np.isnan(maps["eta"][2, 2]) and np.isnan(maps["eta"][0, 2])
    tau = fits.getdata(out / "CH3OH_tau_max.fits")
    mol = lte.load_molecule("CH3OH", freq_range_MHz=(241500.0, 242100.0))
    true_tau = {yx: lte.peak_opacity(FREQ_HZ / 1e6, mol, p) for yx, p in TRUE.items()}
    data, model = fits.getdata(tiny), fits.getdata(out / "model_cube.fits")
    for (y, x), t in true_tau.items():
        if t > 0.05:  # thin lines (0.07-0.5): opacity is loosely constrained
            assert 0.4 < tau[y, x] / t < 2.5
        else:  # nearly transparent (0.04): the data fix eta*N only (checked above), not tau;
            # the fit (chi2 loss) must explain them at least as well as the truth does
            truth = lte.spectrum(FREQ_HZ / 1e6, mol, np.array([TRUE[(y, x)]]))[0]
            chi2 = lambda m: np.nansum(((data[:, y, x] - m) / RMS_K) ** 2)  # noqa: E731
            assert chi2(model[:, y, x]) <= chi2(truth) + 1.0
    assert max(true_tau, key=true_tau.get) == max(true_tau, key=lambda yx: tau[yx])
    assert np.isnan(tau[2, 2]) and np.isnan(tau[0, 2])
    head = fits.getheader(out / "CH3OH_N_tot.fits")
    assert head["BUNIT"] == "cm-2" and head["CTYPE1"] == "RA---SIN" and head["NAXIS"] == 2
    assert model.shape == data.shape and np.isnan(model[140:146]).all()
    resid = (data - model)[:, :2, :2]
    assert np.nanstd(resid) < 2 * RMS_K  # the model explains the lines down to the noise
    saved = json.loads((out / "summary.json").read_text())
    assert saved["catalogue"][0]["sha256"] and saved["input"]["v_lsr_from"].startswith("default")
    assert "fitted=7" in saved["summary_line"] and (out / "quicklook.png").exists()


@pytest.fixture(scope="module")
def run2(tiny, tmp_path_factory):
    """The tiny cube fitted by a pool of two processes: the output folder."""
    out = tmp_path_factory.mktemp("run2")
    fit_cube.main(config(tiny, out, workers=2))
    return out


def test_two_workers_identical_to_one(run1, run2):
    # OpenBLAS changes the last digits with its thread count; --workers 1 limits it to one
    # thread (as in the workers) through threadpoolctl, an optional dependency.
    pytest.importorskip("threadpoolctl", reason="needed for one BLAS thread in-process")
    assert_same_maps(read_maps(run1[0]), read_maps(run2))


def test_dask_local_cluster_identical(tiny, run2, tmp_path):
    pytest.importorskip("dask.distributed", reason="dask[distributed] is optional")
    fit_cube.main(config(tiny, tmp_path, workers=2, scheduler="local"))
    assert_same_maps(read_maps(run2), read_maps(tmp_path))


def test_resume_after_interruption(tiny, run1, tmp_path, monkeypatch):
    real, calls = spectuner.fit_spectrum, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as Ctrl-C in the middle of the fifth fit
        return real(*args, **kw)

    monkeypatch.setattr(spectuner, "fit_spectrum", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit_cube.main(config(tiny, tmp_path))
    partial = json.loads((tmp_path / "summary.json").read_text())
    assert not partial["complete"] and partial["counts"]["pending"] > 0
    assert (fits.getdata(tmp_path / "status.fits") == -1).any()
    monkeypatch.setattr(spectuner, "fit_spectrum", real)
    summary = fit_cube.main(config(tiny, tmp_path, resume=True))
    assert summary["complete"] and summary["timing"]["pixels_this_run"] < 9
    assert_same_maps(read_maps(run1[0]), read_maps(tmp_path))
    with pytest.raises(ValueError, match="holds a run with other"):
        fit_cube.main(config(tiny, tmp_path, resume=True, n_init=7))


def test_second_pass_fits_start_from_the_first_pass_neighbours(tiny, run1, tmp_path,
                                                               monkeypatch):  # fmt: skip
    """Pass 2 (cube_passes.py) hands each pixel the fits of its fitted pass-1 neighbours and
    one refinement; pass 1 and --no-neighbours fit with the options as given; the losses
    of the tiny cube are within 5 % of one pass's."""
    real, calls = spectuner.fit_spectrum, {}

    def recording(windows, mols, **kw):
        pixel = (len(calls), kw.get("extra_starts"), kw["n_refine"])
        calls[tuple(np.round(windows[0].T_obs_K[:3], 6))] = pixel
        return real(windows, mols, **kw)

    monkeypatch.setattr(spectuner, "fit_spectrum", recording)
    fit_cube.main(config(tiny, tmp_path / "two", n_refine=2))
    data = fits.getdata(tiny)
    by_pixel = {}
    for y in range(3):
        for x in range(3):
            key = tuple(np.round(data[:3, y, x].astype(float), 6))
            if key in calls:
                by_pixel[(y, x)] = calls[key]
    first = {(0, 0), (2, 0)}  # (0, 2) has too few peaks and (2, 2) is blank: never fitted
    assert {p for p, (_, extra, _) in by_pixel.items() if extra is None} == first | {(1, 2)}
    assert max(by_pixel[p][0] for p in first) < min(by_pixel[p][0] for p in by_pixel
                                                    if p not in first)  # fmt: skip
    records = load_chunks_dict(tmp_path / "two")
    for p, (_, extra, n_refine) in by_pixel.items():
        near = sorted(q for q in first if abs(q[0] - p[0]) <= 1 and abs(q[1] - p[1]) <= 1)
        if p in first or not near:  # (1, 2): no fitted pass-1 neighbour, the full method
            assert extra is None and n_refine == 2
            continue
        assert n_refine == 1 and np.array_equal(extra, np.array([records[q] for q in near]))
    calls.clear()
    fit_cube.main(config(tiny, tmp_path / "one", n_refine=2, neighbours=False))
    assert all(extra is None and n == 2 for _, extra, n in calls.values())
    two, one = read_maps(tmp_path / "two"), read_maps(tmp_path / "one")
    assert np.array_equal(two["status.fits"], one["status.fits"])
    fitted = np.isfinite(one["loss.fits"])  # chi2 losses ~1; the fits of one refinement from
    # a neighbour may end a little higher (3.8 % at (1, 1) here, docs/benchmarks.md §4)
    assert (two["loss.fits"][fitted] <= 1.05 * one["loss.fits"][fitted]).all()


def load_chunks_dict(out):
    """{(y, x): fitted values} of a run's chunks."""
    rec = fit_cube.load_chunks(Path(out) / "chunks")
    return {(int(y), int(x)): v for y, x, v in zip(rec["y"], rec["x"], rec["values"])}


def test_chunks_of_an_older_run_without_tau_max_still_load(tmp_path):
    rec = dict(y=1, x=2, code=0, reason="", rms=0.1, n_peaks=3, loss=1.0, nfev=100, time_s=0.1,
               cpu_s=0.1, values=np.arange(10.0), errors=np.ones(10))  # fmt: skip
    rec["tau_max"] = rec["at_bound"] = rec["dchi2"] = np.ones(2)  # two molecules
    fit_cube.flush_chunk(tmp_path, [dict(rec)])
    new = ("tau_max", "at_bound", "dchi2")
    old = {k: np.array([rec[k]]) for k in fit_cube.REC_KEYS if k not in new}
    np.savez(tmp_path / "chunk_000002.npz", **old)  # as written before tau_max existed
    loaded = fit_cube.load_chunks(tmp_path)
    assert loaded["tau_max"].shape == (2, 2) and loaded["values"].shape == (2, 10)
    assert loaded["at_bound"].shape == (2, 2) and np.isnan(loaded["dchi2"][1]).all()
    assert (loaded["tau_max"][0] == 1).all() and np.isnan(loaded["tau_max"][1]).all()


def test_failing_pixel_is_marked_and_run_goes_on(tiny, tmp_path, monkeypatch):
    real = spectuner.fit_spectrum
    seed_1_0 = int(np.random.SeedSequence([0, 1, 0]).generate_state(1)[0])  # pixel (1, 0)

    def flaky(windows, *args, **kw):
        if kw["seed"] == seed_1_0:
            raise FloatingPointError("overflow in the model")
        return real(windows, *args, **kw)

    monkeypatch.setattr(spectuner, "fit_spectrum", flaky)
    summary = fit_cube.main(config(tiny, tmp_path, region="0:2,0:2"))
    status = fits.getdata(tmp_path / "status.fits")
    assert status[1, 0] == 5 and (status[[0, 0, 1], [0, 1, 1]] == 0).all()
    assert (status[:, 2] == 1).all() and (status[2] == 1).all()  # outside the region
    assert summary["counts"]["reasons"]["failed"] == {"FloatingPointError": 1}
    assert "failed=1 (FloatingPointError=1)" in summary["summary_line"]
    text = (tmp_path / "failures.csv").read_text()
    assert "1,0,5," in text and "pixel (y, x)=(1, 0)" in text and "seed=" in text


def test_options_mask_rms_continuum_and_errors(tiny, tmp_path):
    mask = write(tmp_path / "mask.fits", [[1, 0, 0], [0, 0, 0], [0, 0, 0]], fits.Header())
    cont = write(tmp_path / "cont.fits", np.full((3, 3), 2.0), fits.Header({"BUNIT": "K"}))
    s = fit_cube.main(config(tiny, tmp_path / "a", mask=mask, rms="0.1", continuum=cont))
    assert s["counts"]["fitted"] == 1 and s["counts"]["outside"] == 8
    assert fits.getdata(tmp_path / "a" / "rms.fits")[0, 0] == pytest.approx(0.1)
    bad = [
        (dict(mol=[]), ValueError, "no molecule"),
        (dict(method="magic"), ValueError, "--method"),
        (dict(fix=["T_kin=3"]), ValueError, "unknown parameter"),
        (dict(continuum=str(tmp_path / "none.fits")), FileNotFoundError, "continuum"),
        (dict(rms=str(tmp_path / "none.fits")), FileNotFoundError, "noise"),
    ]
    for kw, err, match in bad:
        with pytest.raises(err, match=match):
            fit_cube.main(config(tiny, tmp_path / "b", **kw))
    jy = write(tmp_path / "jy.fits", np.ones((3, 3)), fits.Header({"BUNIT": "Jy/beam"}))
    with pytest.raises(ValueError, match="no beam is known"):
        fit_cube.main(config(tiny, tmp_path / "b", continuum=jy))
    assert fit_cube.cli([str(tmp_path / "none.fits"), "--mol", "CH3OH"]) == 2


def test_cli_parses_options():
    cfg = fit_cube.parse_config(["c.fits", "--mol", "CH3OH", "CH3OCHO", "--mol", "CO",
                                 "--v_lsr", "2.7", "--resume", "--fix", "eta=0.5"])  # fmt: skip
    assert cfg.mol == ["CH3OH", "CH3OCHO", "CO"] and cfg.v_lsr == 2.7 and cfg.resume
    assert cfg.fix == ["eta=0.5"] and np.isnan(fit_cube.parse_config(["c.fits"]).v_lsr)


# --- the demo ---


def test_demo_cube_is_reproducible_and_recovered(tmp_path):
    demo = ROOT / "data" / "demo_cube.fits"
    truth = fit_cube.make_demo(str(tmp_path / "demo.fits"))
    # the committed file is the command's output; lte's last digits may move (1 % of the noise)
    remade = fits.getdata(tmp_path / "demo.fits")
    assert np.allclose(fits.getdata(demo), remade, rtol=0, atol=1e-5, equal_nan=True)
    assert demo.stat().st_size < 2e6
    # rows 6-7 (16 pixels, a quarter of the demo, for time) hold the blank and the empty pixels
    s = fit_cube.main(fit_cube.Config(cube=str(demo), mol=["CH3OH"], out=str(tmp_path / "fit"),
                                      workers=2, quiet=True, region="0:8,6:8"))  # fmt: skip
    assert s["input"]["v_lsr_kms"] == 5.0 and s["input"]["unit"] == "Jy/beam"
    fit = {p: fits.getdata(tmp_path / "fit" / f"CH3OH_{p}.fits") for p in spectuner.PARAM_NAMES}
    status = fits.getdata(tmp_path / "fit" / "status.fits")
    assert status[7, 0] == 2 and (status[[6, 7, 7], [7, 6, 7]] == 8).all()  # limits
    assert (status[:6] == 1).all()
    ok = np.isin(status, (0, 6))
    assert ok.sum() == 12
    # Peak S/N is 40-80 per line in these rows (up to 250 in the core). A pixel counts as
    # recovered when T_ex and delta_v are within 10 %, eta*N_tot within 15 % (eta and N alone
    # are degenerate for thin lines) and v_off within 0.15 km/s; random+slsqp with 50 starts
    # can end in a local minimum now and then, so 90 % of the pixels must be recovered, not all.
    good = (
        (np.abs(fit["T_ex"] / truth["T_ex"] - 1) < 0.1)
        & (np.abs(fit["delta_v"] / truth["delta_v"] - 1) < 0.1)
        & (np.abs(fit["eta"] * fit["N_tot"] / (truth["eta"] * truth["N_tot"]) - 1) < 0.15)
        & (np.abs(fit["v_off"] - truth["v_off"]) < 0.15)
    )
    assert (good & ok).sum() >= 0.9 * ok.sum()


def test_nn_method_needs_its_policy_file(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        fit_cube.main(config(tiny, tmp_path, method="nn+slsqp", policy=str(tmp_path / "no.pt")))


def test_auto_method_without_policy_falls_back_to_random(tiny, tmp_path):
    cfg = config(tiny, tmp_path, policy=str(tmp_path / "no.pt"), region="0:1,0:1")
    summary = fit_cube.main(cfg)
    assert summary["config"]["method"] == "random+slsqp"


# --- runs that survive schedulers, exit codes, one-line errors (issue 14) ---


def descendants(pid):
    """Pids of every live (not zombie) process below pid, read from /proc (Linux)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parent[int(stat.parent.name)] = int(fields[1])
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parent.items() if pp == p}
        todo += list(kids - found)
        found |= kids
    return found


def alive(pids):
    """The pids that still exist and are not zombies."""
    out = set()
    for p in pids:
        try:
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.add(p)
        except OSError:
            pass
    return out


def start_demo_fit(out, *extra):
    """A demo fit with two workers in a subprocess, and the pids below it once the pool is up."""
    import subprocess
    import time

    args = [
        sys.executable,
        "fit_cube.py",
        "data/demo_cube.fits",
        "--mol",
        "CH3OH",
        "--out",
        str(out),
        "--workers",
        "2",
        "--method",
        "random+slsqp",
        "--flush_every",
        "2",
        *extra,
    ]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0, kids = time.time(), set()
    while time.time() - t0 < 120 and not list((out / "chunks").glob("chunk_*.npz")):
        kids |= descendants(proc.pid)
        time.sleep(0.2)
    kids |= descendants(proc.pid)
    assert proc.poll() is None and len(kids) >= 2, (proc.poll(), kids)
    return proc, kids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_sigterm_flushes_like_ctrl_c_and_leaves_no_process(tmp_path):
    import signal
    import time

    proc, kids = start_demo_fit(tmp_path / "fit")
    proc.send_signal(signal.SIGTERM)  # as a batch scheduler stops a job
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and b"--resume" in err, err
    summary = json.loads((tmp_path / "fit" / "summary.json").read_text())
    assert not summary["complete"] and summary["counts"]["fitted"] > 0
    t0 = time.time()
    while alive(kids) and time.time() - t0 < 10:
        time.sleep(0.2)
    assert not alive(kids)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_workers_die_with_a_killed_parent(tmp_path):
    import signal
    import time

    proc, kids = start_demo_fit(tmp_path / "fit")
    proc.send_signal(signal.SIGKILL)  # as an out-of-memory kill: no handler runs
    proc.wait(timeout=30)
    t0 = time.time()
    while alive(kids) and time.time() - t0 < 10:
        time.sleep(0.2)
    assert not alive(kids), "workers or the resource tracker outlived their parent"


def test_out_of_an_earlier_run_needs_resume_or_overwrite(tiny, tmp_path, capsys):
    args = [tiny, "--mol", "CH3OH", "--out", str(tmp_path), "--loss", "chi2", "--n_init", "10",
            "--workers", "1", "--quiet", "--region", "0:1,0:1"]  # fmt: skip
    assert fit_cube.cli(args) == 0
    first = sorted((tmp_path / "chunks").glob("*.npz"))
    capsys.readouterr()
    assert fit_cube.cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path) in err and err.count("\n") == 1
    assert "--resume" in err and "--overwrite" in err
    assert sorted((tmp_path / "chunks").glob("*.npz")) == first  # nothing deleted
    (tmp_path / "old_M_eta.fits").write_bytes((tmp_path / "CH3OH_eta.fits").read_bytes())
    (tmp_path / "notes.txt").write_text("mine")
    assert fit_cube.cli(args + ["--overwrite"]) == 0
    assert not (tmp_path / "old_M_eta.fits").exists() and (tmp_path / "notes.txt").exists()
    assert fit_cube.cli(args + ["--overwrite", "--resume"]) == 2


def test_bad_input_stops_before_the_first_pixel_with_one_line(tiny, tmp_path, capsys):
    nan_cube = tmp_path / "nan.fits"
    write(nan_cube, np.full((300, 3, 3), np.nan), header_3d(300, 3, 3))
    truncated = tmp_path / "cut.fits"
    truncated.write_bytes(Path(tiny).read_bytes()[: Path(tiny).stat().st_size // 2])
    text = tmp_path / "text.fits"
    text.write_text("not a FITS file\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    base = ["--mol", "CH3OH", "--quiet", "--workers", "1"]
    cases = [
        ([tiny, "--mol", "SiO"], "SiO has no line"),
        ([tiny, "--rms", "0"], "--rms"),
        ([tiny, "--rms", "-1"], "--rms"),
        ([tiny, "--workers", "-3"], "--workers"),
        ([tiny, "--region", "0:100,0:2"], "beyond"),
        ([tiny, "--n_init", "0"], "--n_init"),
        ([tiny, "--n_init", "-4"], "--n_init"),
        ([tiny, "--maxiter", "-1"], "--maxiter"),
        ([str(nan_cube)], "no finite value"),
        ([str(truncated)], str(truncated)),
        ([str(text)], str(text)),
        ([tiny, "--out", str(a_file)], "is a file"),
        ([tiny, "--out", str(a_file / "sub")], "is a file"),
        ([tiny, "--mol", str(tmp_path / "none.cat")], "not found"),
    ]
    for args, message in cases:
        out = ["--out", str(tmp_path / "out")] if "--out" not in args else []
        assert fit_cube.cli(args[:1] + base + out + args[1:]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out" / "chunks").exists(), args  # stopped before any pixel


def test_workers_are_checked_and_capped():
    assert fit_cube.resolve_workers(0, 2) == (2, "")
    assert fit_cube.resolve_workers(3, 2) == (3, "")
    n, note = fit_cube.resolve_workers(500, 2)
    assert n == 8 and "500" in note and "8" in note
    with pytest.raises(ValueError, match="--workers -3"):
        fit_cube.resolve_workers(-3, 2)


def test_a_run_that_fits_nothing_exits_1_and_says_why(tiny, tmp_path, capsys, monkeypatch):
    args = [tiny, "--mol", "CH3OH", "--loss", "chi2", "--n_init", "5", "--workers", "1"]
    assert fit_cube.cli(args + ["--region", "2:3,0:1", "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "no pixel was fitted" in err and "few_peaks=1" in err

    def broken(*a, **kw):
        raise ValueError("the model is broken")

    monkeypatch.setattr(spectuner, "fit_spectrum", broken)
    assert fit_cube.cli(args + ["--region", "0:2,0:1", "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "no pixel was fitted" in err and "the model is broken" in err


def test_descending_spectral_axis_gives_the_same_fit(tmp_path):
    demo = ROOT / "data" / "demo_cube.fits"
    with fits.open(demo) as hdul:
        data, head = hdul[0].data[:, ::-1], hdul[0].header.copy()
        n = data.shape[1]
        head["CRVAL3"] += (n - 1) * head["CDELT3"]
        head["CDELT3"] = -head["CDELT3"]
        write(tmp_path / "flip.fits", data, head)
    cube = fit_cube.read_cube(str(tmp_path / "flip.fits"))
    assert (np.diff(cube["freq_MHz"]) > 0).all()
    assert np.array_equal(cube["data"], fit_cube.read_cube(str(demo))["data"], equal_nan=True)
    kw = dict(mol=["CH3OH"], method="random+slsqp", loss="chi2", n_init=20, workers=1, quiet=True,
              region="0:8,3:4")  # fmt: skip
    fit_cube.main(fit_cube.Config(cube=str(demo), out=str(tmp_path / "a"), **kw))
    fit_cube.main(fit_cube.Config(cube=str(tmp_path / "flip.fits"), out=str(tmp_path / "b"), **kw))
    a, b = read_maps(tmp_path / "a"), read_maps(tmp_path / "b")
    model_a, model_b = a.pop("model_cube.fits"), b.pop("model_cube.fits")
    assert_same_maps(a, b)
    assert np.array_equal(model_a, model_b[:, ::-1], equal_nan=True)  # in the file's order
    assert fits.getheader(tmp_path / "b" / "model_cube.fits")["CDELT3"] < 0


def test_noise_estimate_of_the_demo_is_unbiased():
    cube = fit_cube.read_cube(str(ROOT / "data" / "demo_cube.fits"))
    S = dict(rms=None)
    pixels = [(y, x) for y in range(8) for x in range(8) if (y, x) != (7, 0)]  # (7, 0) blank
    est = np.array([fit_cube.pixel_rms(S, y, x, cube["data"][:, y, x].astype(float))
                    for y, x in pixels])  # fmt: skip
    peak = np.array([np.nanmax(cube["data"][:, y, x]) for y, x in pixels])
    assert np.median(est) == pytest.approx(1e-3, rel=0.03)  # injected: 1 mJy/beam
    bright = est[np.argsort(peak)[-16:]]  # lines of 40-250 sigma: the old estimate was 1.1-1.5
    assert np.median(bright) == pytest.approx(1e-3, rel=0.05)
    assert est.max() < 1.2e-3  # single pixels: 430 channels, ~5 % scatter


def test_help_shows_every_method_defaults_and_required(capsys):
    with pytest.raises(SystemExit) as stop:
        fit_cube.parse_config(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(m in text for m in spectuner.METHODS)
    assert "default: 50" in text and "required" in text


def test_make_demo_help_prints_help_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        fit_cube.cli(["make_demo", "--help"])
    assert stop.value.code == 0 and "make_demo" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_quicklook_has_labels_units_and_status_names():
    pytest.importorskip("matplotlib")
    maps = fit_cube.assemble({k: np.zeros((0,)) for k in fit_cube.REC_KEYS}, np.ones((3, 3), bool),
                             5)  # fmt: skip
    maps["values"][:] = 1.0
    fig = fit_cube.quicklook_figure(maps, ["CH3OH"], "Jy/beam")
    titles = [ax.get_title() for ax in fig.axes]
    assert any("log10 N_tot [cm-2]" in t for t in titles)
    assert any("rms [Jy/beam]" in t for t in titles)
    assert all(ax.get_xlabel() for ax in fig.axes if ax.get_title())
    ticks = [t.get_text() for ax in fig.axes for t in ax.get_yticklabels()]
    assert {"fitted", "failed", "few_peaks", "pending"} <= set(ticks)
    words = " ".join(t.get_text() for t in fig.texts) + " ".join(titles)
    assert "degenerate" in words


# --- faces of the box and non-detections (issue 15) ---


def test_empty_region_gets_upper_limits_and_the_rest_is_fitted(tmp_path):
    """Row 0 holds CH3OH, rows 1-2 noise only: limits there (status 8), fits in row 0."""
    mol = lte.load_molecule("CH3OH", freq_range_MHz=(241500.0, 242100.0))
    rng = np.random.default_rng(5)
    data = rng.normal(0.0, RMS_K, (300, 3, 3))
    lines = [(0.8, 100.0, 3e16, 2.0, -1.0), (0.6, 150.0, 1e16, 3.0, 0.5), (0.7, 120, 2e16, 2, 0)]
    for x, p in enumerate(lines):
        data[:, 0, x] += lte.spectrum(FREQ_HZ / 1e6, mol, np.array([p]))[0]
    cube = write(tmp_path / "empty.fits", data, header_3d(300, 3, 3))
    s = fit_cube.main(config(cube, tmp_path / "out"))
    status = fits.getdata(tmp_path / "out" / "status.fits")
    upper = fits.getdata(tmp_path / "out" / "CH3OH_N_tot_upper.fits")
    N_tot = fits.getdata(tmp_path / "out" / "CH3OH_N_tot.fits")
    assert (status[0] == 0).all() and (status[1:] == 8).all()
    assert np.isnan(upper[0]).all() and np.isfinite(N_tot[0]).all()
    assert np.isfinite(upper[1:]).all() and np.isnan(N_tot[1:]).all()
    assert s["counts"]["limit"] == 6 and "limits=6" in s["summary_line"]
    ref = s["limits"]["reference"]["CH3OH"]  # the median of the three detected pixels
    assert ref["T_ex"] == pytest.approx(np.median([p[1] for p in lines]), rel=0.1)
    assert ref["delta_v"] == pytest.approx(2.0, rel=0.1)
    # thin lines at 0.1 K noise: the 3-sigma limit is a small fraction of the fitted columns,
    # and the same at every empty pixel within the scatter of the noise
    assert (upper[1:] < 0.05 * N_tot[0].min()).all() and upper[1:].max() < 3 * upper[1:].min()
    # it is spectuner.detect_and_limit's at the reference, on the pixel's own spectrum
    X = np.array([ref[p] if p != "N_tot" else 0.0 for p in spectuner.PARAM_NAMES])
    rms = fits.getdata(tmp_path / "out" / "rms.fits")[1, 1]
    w = [spectuner.Window(FREQ_HZ / 1e6, data[:, 1, 1].astype(np.float32).astype(float), rms)]
    resid_x = lambda X: spectuner.noise_residuals(w, [mol], X)  # noqa: E731
    det = spectuner.detect_and_limit(resid_x, X, 0, spectuner.make_box(["CH3OH"]))
    assert not det["detected"] and det["N_tot_upper"] == pytest.approx(upper[1, 1], rel=1e-5)
    at_bound = fits.getdata(tmp_path / "out" / "CH3OH_at_bound.fits")
    assert s["counts"]["at_bound"] == int((at_bound[0] > 0).sum()) and np.isnan(at_bound[1:]).all()
