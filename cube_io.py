"""Reading a spectral cube and the images that go with it; the demo cube (docs/method.md §9).

read_cube takes a FITS cube in any axis order to (C, Y, X) with ascending observed frequencies
(FREQ axis, or a velocity or wavelength axis with RESTFRQ), the factor from its unit (K,
Jy/beam with one beam or a CASA BEAMS table per channel) to K, and its celestial WCS for the
maps. read_plane and read_continuum read 2-D images of the same map (mask, noise, continuum);
parse_region reads --region. make_demo writes the seeded synthetic cube of data/demo_cube.fits.

    import cube_io
    cube = cube_io.read_cube("data/demo_cube.fits")  # cube["data"]: (C, Y, X), cube["freq_MHz"]
"""

import re
import warnings
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

import lte
from problem import PARAM_NAMES as PARAMS

C_MS = lte.C_KMS * 1e3  # speed of light [m/s]
K_PER_JY = 1.222e6  # T [K] = 1.222e6 S [Jy/beam] / (nu_GHz^2 theta_maj theta_min [arcsec^2])
# FITS spectral world value w (SI: Hz, m/s, m, or redshift) and rest frequency f0 [Hz] -> Hz
TO_HZ = {
    "FREQ": lambda w, f0: w,
    "VRAD": lambda v, f0: f0 * (1.0 - v / C_MS),
    "VOPT": lambda v, f0: f0 / (1.0 + v / C_MS),
    "ZOPT": lambda z, f0: f0 / (1.0 + z),
    "VELO": lambda v, f0: f0 * np.sqrt((C_MS - v) / (C_MS + v)),
    "WAVE": lambda lam, f0: C_MS / lam,
}
UNITS = {"k": ("K", 1.0), "kelvin": ("K", 1.0), "mk": ("K", 1e-3), "jy/beam": ("Jy/beam", 1.0),
         "mjy/beam": ("Jy/beam", 1e-3), "ujy/beam": ("Jy/beam", 1e-6),
         "jy": ("Jy/beam", 1.0)}  # fmt: skip
V_LSR_KEYS = ("VELO-LSR", "VLSR", "VSYS")  # header keywords for the systemic velocity, m/s


# --- reading the cube (docs/method.md §9) ---


def brightness_unit(bunit: str) -> tuple[str, float]:
    """("K" or "Jy/beam", scale to that unit) of a FITS BUNIT string.

    Raises:
        ValueError: an unknown unit (the message lists the accepted ones).
    """
    s = re.sub(r"[\s.*]|\(.*\)$", "", bunit.lower())
    s = s.replace("beam^-1", "/beam").replace("beam-1", "/beam").replace("/bm", "/beam")
    if s not in UNITS:
        raise ValueError(f"BUNIT {bunit!r} unknown; expected one of {sorted(UNITS)} (or --bunit)")
    return UNITS[s]


def read_beams(hdul: fits.HDUList, header: fits.Header, n_chan: int) -> np.ndarray | None:
    """Beam (BMAJ, BMIN) per channel [arcsec] (C, 2): the CASA BEAMS table, else BMAJ/BMIN.

    Raises:
        ValueError: a BEAMS table whose channel count differs from the cube's.
    """
    if "BEAMS" in hdul:
        table = hdul["BEAMS"].data
        cols = hdul["BEAMS"].columns
        rows = table[table["POL"] == 0] if "POL" in cols.names else table
        rows = rows[np.argsort(rows["CHAN"])] if "CHAN" in cols.names else rows
        if len(rows) != n_chan:
            raise ValueError(f"BEAMS table has {len(rows)} beams for {n_chan} channels")
        scale = [u.Unit(cols[k].unit or "arcsec").to(u.arcsec) for k in ("BMAJ", "BMIN")]
        return np.column_stack([rows["BMAJ"] * scale[0], rows["BMIN"] * scale[1]]).astype(float)
    if "BMAJ" in header and "BMIN" in header:
        return np.tile([header["BMAJ"] * 3600.0, header["BMIN"] * 3600.0], (n_chan, 1))
    return None


def _spectral_Hz(w: WCS, n_chan: int) -> np.ndarray:
    """Observed frequency [Hz] of each channel of the spectral axis of w."""
    ax = w.wcs.spec
    world = w.sub([ax + 1]).wcs_pix2world(np.arange(n_chan, dtype=float), 0)[0]
    kind = w.wcs.ctype[ax][:4]
    f0 = w.wcs.restfrq or (C_MS / w.wcs.restwav if w.wcs.restwav else 0.0)
    if kind not in TO_HZ:
        raise ValueError(f"spectral axis {w.wcs.ctype[ax]!r}; expected one of {sorted(TO_HZ)}")
    if kind not in ("FREQ", "WAVE") and f0 <= 0:
        raise ValueError(f"velocity axis {w.wcs.ctype[ax]!r} needs RESTFRQ (or RESTWAV)")
    freq = TO_HZ[kind](world, f0)
    step = np.diff(freq)
    if n_chan < 2 or not np.isfinite(freq).all() or not ((step > 0).all() or (step < 0).all()):
        raise ValueError(f"spectral axis gives {n_chan} channels, not strictly monotonic")
    return freq


def read_cube(path: str, bunit: str = "") -> dict:
    """Read a FITS cube into (C, Y, X) with its frequencies, unit factors and 2-D WCS.

    Any axis order; CRPIX, CDELT sign and CUNIT honoured by wcslib; degenerate axes (Stokes)
    dropped. Y is the spatial axis with the higher FITS index, X the lower. The channels come
    in ascending frequency whatever the file's order (descending is True when the file's
    frequencies fall: data, freq_MHz, K_per_unit and beam_arcsec are then flipped), so that a
    fit does not depend on it.

    Args:
        path: FITS file; the first HDU with >= 3 axes is the cube.
        bunit: overrides the header BUNIT ("K" or "Jy/beam").
    Returns:
        dict: data (C, Y, X) float32 in the file's unit; freq_MHz (C,) observed frame;
        K_per_unit (C,) to convert to K; unit; beam_arcsec (C, 2) or None; wcs2d (fits.Header);
        header; order (numpy axes of C, Y, X, then the rest); shape (file array); specsys;
        restfrq_Hz; v_lsr_kms from the header or None; descending.
    Raises:
        FileNotFoundError: no such file. ValueError: not a readable FITS file (truncated, or
        another format), no cube, a non-degenerate extra axis, a spectral axis that cannot be
        read, an unknown unit, or Jy/beam without a beam.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"cube {path} not found")
    with warnings.catch_warnings(record=True) as caught:  # one line for a damaged file
        try:
            cube = _read_hdu(path)
        except (OSError, TypeError, EOFError) as err:  # astropy's, for truncated or not FITS
            raise ValueError(f"cube {path} is not a readable FITS file ({err})") from None
    for w in caught:
        if "truncated" in str(w.message):
            raise ValueError(f"cube {path} is not a readable FITS file ({w.message})")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    data, freq_Hz, beams, header, w, spatial, order, shape = cube
    n_chan = data.shape[0]
    descending = bool(freq_Hz[0] > freq_Hz[-1])
    if descending:  # ascending channels: the fit must not depend on the file's order
        data, freq_Hz = np.ascontiguousarray(data[::-1]), freq_Hz[::-1].copy()
        beams = None if beams is None else beams[::-1].copy()
    unit, scale = brightness_unit(bunit or header.get("BUNIT", ""))
    factor = np.full(n_chan, scale)
    if unit == "Jy/beam":
        if beams is None:
            raise ValueError(f"{path}: BUNIT is Jy/beam but there is no BMAJ/BMIN or BEAMS table")
        factor = scale * K_PER_JY / ((freq_Hz / 1e9) ** 2 * beams[:, 0] * beams[:, 1])
    v_key = next((k for k in V_LSR_KEYS if k in header), None)
    return dict(data=data, freq_MHz=freq_Hz / 1e6, K_per_unit=factor, unit=unit, beam_arcsec=beams,
                wcs2d=w.sub([spatial[0] + 1, spatial[1] + 1]).to_header(), header=header,
                order=order, shape=shape, specsys=w.wcs.specsys, restfrq_Hz=w.wcs.restfrq,
                v_lsr_kms=header[v_key] / 1e3 if v_key else None,
                descending=descending)  # fmt: skip


def _read_hdu(path: str) -> tuple:
    """(data (C, Y, X) in the file's channel order, freq_Hz, beams, header, wcs, spatial axes,
    numpy axis order, file shape) of the cube in path; the errors of read_cube."""
    with fits.open(path) as hdul:
        hdu = next((h for h in hdul if h.is_image and h.header.get("NAXIS", 0) >= 3), None)
        if hdu is None:
            raise ValueError(f"{path}: no image HDU with >= 3 axes")
        header, arr = hdu.header.copy(), np.asarray(hdu.data, dtype=np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)  # wcslib notes fixed date keys
            try:
                w = WCS(header)
            except ValueError as err:  # wcslib's errors are ValueErrors without the file name
                raise ValueError(f"{path}: invalid WCS: {err}") from err
        n = w.naxis
        if w.wcs.spec < 0:
            raise ValueError(f"{path}: no spectral axis among CTYPE {list(w.wcs.ctype)}")
        spatial = [i for i in range(n) if i != w.wcs.spec and w.wcs.ctype[i][:6] != "STOKES"]
        spatial = [i for i in spatial if arr.shape[n - 1 - i] > 1] if len(spatial) > 2 else spatial
        if len(spatial) != 2:
            raise ValueError(f"{path}: expected 2 spatial axes, got CTYPE {list(w.wcs.ctype)}")
        fits_axes = [w.wcs.spec, spatial[1], spatial[0]]
        others = [i for i in range(n) if i not in fits_axes]
        if any(arr.shape[n - 1 - i] != 1 for i in others):
            raise ValueError(f"{path}: extra axis {[w.wcs.ctype[i] for i in others]} not of size 1")
        order = [n - 1 - i for i in fits_axes + others]
        n_chan = arr.shape[order[0]]
        data = arr.transpose(order).reshape(n_chan, arr.shape[order[1]], arr.shape[order[2]])
        freq_Hz = _spectral_Hz(w, n_chan)
        beams = read_beams(hdul, header, n_chan)
    return data, freq_Hz, beams, header, w, spatial, order, arr.shape


def systemic_velocity(v_lsr: float, cube: dict) -> tuple[float, str]:
    """(v_lsr km/s, where it came from): --v_lsr if given, else the header's, else 0."""
    if np.isfinite(v_lsr):
        return v_lsr, "--v_lsr"
    if cube["v_lsr_kms"] is not None:
        return cube["v_lsr_kms"], "header"
    return 0.0, "default (none in the header)"


def read_plane(path: str, shape: tuple, what: str) -> tuple[np.ndarray, fits.Header]:
    """A 2-D image (degenerate axes dropped) of the cube's spatial shape, and its header.

    Raises:
        FileNotFoundError: no such file. ValueError: its shape differs from the cube's.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} image {path} not found")
    with fits.open(path) as hdul:
        hdu = next(h for h in hdul if h.is_image and h.data is not None)
        image = np.squeeze(np.asarray(hdu.data, dtype=float))
        if image.shape != tuple(shape):
            raise ValueError(f"{what} image {path} has shape {image.shape}; the cube has {shape}")
        return image, hdu.header


def read_continuum(path: str, cube: dict) -> np.ndarray:
    """T_bg [K] per pixel from a continuum image in K or Jy/beam (its own beam, else the cube's).

    Raises:
        ValueError: Jy/beam and no beam known (and the errors of read_plane).
    """
    image, head = read_plane(path, cube["data"].shape[1:], "continuum")
    unit, scale = brightness_unit(head.get("BUNIT", "K"))
    if unit == "K":
        return image * scale
    if "BMAJ" in head and "BMIN" in head:
        beam = (head["BMAJ"] * 3600.0, head["BMIN"] * 3600.0)
    elif cube["beam_arcsec"] is not None:
        beam = np.median(cube["beam_arcsec"], axis=0)
    else:
        raise ValueError(f"continuum {path} is in Jy/beam but no beam is known")
    nu_GHz = np.median(cube["freq_MHz"]) / 1e3  # converted at the cube's central frequency
    return image * scale * K_PER_JY / (nu_GHz**2 * beam[0] * beam[1])


def read_noise(rms: str, selected: np.ndarray, unit: str) -> np.ndarray | None:
    """The --rms noise (Y, X) in the cube's unit: a number or a FITS map; None for "" (estimate).

    Raises:
        ValueError: no noise > 0 in the selected pixels (and the errors of read_plane).
    """
    if not rms:
        return None
    try:
        noise = np.full(selected.shape, float(rms))
    except ValueError:
        noise = read_plane(rms, selected.shape, "noise")[0]
    if not (noise[selected] > 0).any():  # NaN compares False
        raise ValueError(f"--rms {rms}: expected a noise > 0 (in {unit}) in the selected pixels")
    return noise


def parse_region(region: str, shape: tuple) -> tuple[slice, slice]:
    """Pixel box "X0:X1,Y0:Y1" (0-based, end excluded) -> (y slice, x slice) inside the map.

    Raises:
        ValueError: not of that form, an empty box, or a box reaching beyond the map (it is
        not clipped: a typo would otherwise fit another box than the one meant).
    """
    m = re.fullmatch(r"\s*(\d+):(\d+)\s*,\s*(\d+):(\d+)\s*", region)
    x0, x1, y0, y1 = (int(g) for g in m.groups()) if m else (0, 0, 0, 0)
    ny, nx = shape
    if not m or x0 >= x1 or y0 >= y1:
        raise ValueError(f"--region {region!r}: expected X0:X1,Y0:Y1 with X0 < X1 and Y0 < Y1")
    if x1 > nx or y1 > ny:
        raise ValueError(f"--region {region!r} reaches beyond the {nx} x {ny} pixel map "
                         f"(X 0:{nx}, Y 0:{ny}); give a box inside it")  # fmt: skip
    return slice(y0, y1), slice(x0, x1)


def make_demo(path: str, n_pix: int = 8, n_chan: int = 440, seed: int = 0) -> dict:
    """Write a synthetic CH3OH cube made with lte.spectrum: Jy/beam, RA/DEC/FREQ/STOKES.

    Smooth maps (a warm dense core, a velocity gradient, widths rising with y), v_lsr = 5 km/s
    in the header (VELO-LSR), channels of 0.5 MHz from 241.690 GHz, Gaussian noise of 1 mJy/beam
    (0.1 K), 8 blanked channels and one blank pixel. The injected maps are stored as image
    extensions TRUE_<param> so that a fit can be checked against them.

    Returns:
        the injected maps {param: (n_pix, n_pix)}.
    """
    v_lsr, bmaj, bmin = 5.0, 0.5, 0.4  # km/s, arcsec, arcsec
    freq_MHz = 241690.0 + 0.5 * np.arange(n_chan)
    yy, xx = np.mgrid[:n_pix, :n_pix] / max(n_pix - 1, 1)
    r2 = (yy - 0.5) ** 2 + (xx - 0.5) ** 2
    truth = dict(eta=0.5 + 0.4 * np.exp(-r2 / 0.1), T_ex=70.0 + 130.0 * np.exp(-r2 / 0.08),
                 N_tot=10 ** (15.7 + 1.1 * np.exp(-r2 / 0.12)), delta_v=2.0 + 2.0 * yy,
                 v_off=-1.5 + 3.0 * xx)  # fmt: skip
    truth["N_tot"][xx + yy > 1.75] = 1e12  # a corner without the molecule: skipped pixels
    span = lte.reach_kms(12.0, 30.0) / lte.C_KMS  # every line that can reach the band
    rest = freq_MHz * (1 + v_lsr / lte.C_KMS)
    mol = lte.load_molecule("CH3OH", freq_range_MHz=(rest[0] * (1 - span), rest[-1] * (1 + span)))
    P = np.stack([truth[p] for p in PARAMS], axis=-1).reshape(-1, 5)
    T_K = lte.spectrum(rest, mol, P).T.reshape(n_chan, n_pix, n_pix)
    K_per_Jy = K_PER_JY / ((freq_MHz / 1e3) ** 2 * bmaj * bmin)
    rng = np.random.default_rng(seed)
    data = T_K / K_per_Jy[:, None, None] + rng.normal(0.0, 0.001, T_K.shape)
    data[200:208], data[:, n_pix - 1, 0] = np.nan, np.nan
    header = fits.Header()
    cards = dict(BUNIT="Jy/beam", BMAJ=bmaj / 3600, BMIN=bmin / 3600, BPA=0.0, OBJECT="DEMO",
                 CTYPE1="RA---SIN", CRVAL1=248.0946, CDELT1=-0.1 / 3600, CRPIX1=n_pix / 2 + 0.5,
                 CUNIT1="deg", CTYPE2="DEC--SIN", CRVAL2=-24.4757, CDELT2=0.1 / 3600,
                 CRPIX2=n_pix / 2 + 0.5, CUNIT2="deg", CTYPE3="FREQ", CRVAL3=freq_MHz[0] * 1e6,
                 CDELT3=0.5e6, CRPIX3=1.0, CUNIT3="Hz", CTYPE4="STOKES", CRVAL4=1.0, CDELT4=1.0,
                 CRPIX4=1.0, SPECSYS="LSRK", RESTFRQ=241791.352e6, RADESYS="ICRS")  # fmt: skip
    header.update(cards)
    header["VELO-LSR"] = (v_lsr * 1e3, "[m/s] systemic velocity")
    header["HISTORY"] = f"made by: python fit_cube.py make_demo OUT {n_pix} {n_chan} (seed {seed})"
    hdus = [fits.PrimaryHDU(data[None].astype(np.float32), header)]
    hdus += [fits.ImageHDU(truth[p], name=f"TRUE_{p.upper()}") for p in PARAMS]
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return truth
