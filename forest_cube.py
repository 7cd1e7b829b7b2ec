"""A line-forest FITS cube: a hot core with radial T_ex and N gradients and a velocity gradient
(issue 11), written in Jy/beam with a celestial + FREQ WCS that fit_cube.read_cube reads.

Maps (r = distance from the centre in units of the core radius r0, x the position along the
velocity gradient, both in pixels / (n_pix / 2)):

    T_ex_m(r) = T_src (1 + d_m) (1 + r^2)^-0.2        (d_m in +-30 %, as in forest.draw_source)
    N_m(r)    = N_CH3OH x_m exp(-r^2 / 2)              (x_m from forest.SPECIES)
    v_off_m   = v_grad_kms x + scatter_m, fwhm_m = fwhm (1 + 0.5 exp(-r^2)),  eta = 1

Each pixel's spectrum is the sum over molecules of lte.spectrum (forest.forest_spectrum), in K,
converted to Jy/beam with T = 1.222e6 S / (nu_GHz^2 bmaj bmin) [arcsec], plus Gaussian noise.
Frequencies are observed (LSRK, VELO-LSR in the header); rest = observed (1 + v_lsr / c).
Extensions TRUE_<MOLECULE>_<PARAM> (PARAM: ETA, T_EX, N_TOT, DELTA_V, V_OFF, fit_cube's names)
hold the injected maps.

    python forest_cube.py cube out.fits --n_pix 16 --seed 0
    python forest_cube.py cube out.fits --n_pix 32 --n_mol 20 --band 7 --exclude CH3OCHO C2H3CN
"""

import argparse
import dataclasses
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

import forest
import lte

K_PER_JY = 1.222e6  # T [K] = K_PER_JY S [Jy/beam] / (nu_GHz^2 bmaj bmin [arcsec^2])
MAP_NAMES = ("ETA", "T_EX", "N_TOT", "DELTA_V", "V_OFF")  # lte.PARAM_NAMES order


@dataclass
class Config:
    command: str = "cube"  # cube (the only command)
    out: str = "forest_cube.fits"  # output FITS file
    n_pix: int = 16  # pixels per side
    n_chan: int = 1000  # channels
    chan_kms: float = 0.5  # channel width [km/s]
    band: int = 6  # ALMA band 3..7
    n_mol: int = 8  # molecules (CH3OH first, then drawn)
    exclude: list[str] = dataclasses.field(default_factory=list)  # molecules never used (e.g.
    # held-out ones)
    T_src_K: float = 200.0  # central temperature [K]
    log10_N_CH3OH: float = 18.5  # central CH3OH column [log10 cm^-2]
    fwhm_kms: float = 2.0  # line width outside the centre [km/s]
    v_grad_kms: float = 3.0  # velocity change from the centre to the edge [km/s]
    v_lsr_kms: float = 5.0  # systemic velocity written as VELO-LSR [km/s]
    beam_arcsec: float = 0.5  # circular beam FWHM [arcsec]
    pix_arcsec: float = 0.1  # pixel size [arcsec]
    rms_mJy: float = 1.0  # noise [mJy/beam]
    catalog: str = str(forest.CATALOG_DIR)  # catalogue folder
    seed: int = 0  # random seed


def truth_maps(cfg: Config, molecules: dict, rng) -> dict:
    """{molecule: (n_pix, n_pix, 5) eta, T_ex_K, N_tot_cm2, fwhm_kms, v_off_kms} (see above)."""
    yy, xx = (np.mgrid[: cfg.n_pix, : cfg.n_pix] - (cfg.n_pix - 1) / 2) / (cfg.n_pix / 2)
    r2 = (yy**2 + xx**2) / 0.35**2  # core radius r0 = 0.35 of the half-width
    names = [n for n in ["CH3OH"] if n in molecules]
    others = [n for n in sorted(molecules) if n not in names]
    names += [others[i] for i in rng.permutation(len(others))[: max(cfg.n_mol - len(names), 0)]]
    maps = {}
    for name in names:
        lo, hi = forest.SPECIES.get(name, (0, 0, *forest.DEFAULT_RATIO))[2:]
        T0 = cfg.T_src_K * (1.0 + forest.SCATTER["T_frac"] * rng.uniform(-1.0, 1.0))
        N0 = 10**cfg.log10_N_CH3OH * 10 ** rng.uniform(lo, hi)
        dv = forest.SCATTER["v_kms"] * rng.normal()
        maps[name] = np.stack(
            [np.ones_like(r2), T0 * (1.0 + r2) ** -0.2, N0 * np.exp(-r2 / 2.0),
             cfg.fwhm_kms * (1.0 + 0.5 * np.exp(-r2)), cfg.v_grad_kms * xx + dv],
            axis=-1,
        )  # fmt: skip
    return maps


def make_cube(cfg: Config) -> dict:
    """Write the cube to cfg.out and return the truth maps {molecule: (n_pix, n_pix, 5)}."""
    if cfg.band not in forest.BANDS_GHZ:
        raise ValueError(f"--band {cfg.band} unknown; expected one of {sorted(forest.BANDS_GHZ)}")
    if cfg.n_pix < 2 or cfg.n_chan < 16 or cfg.n_mol < 1:
        raise ValueError(f"need n_pix >= 2, n_chan >= 16, n_mol >= 1; got {cfg}")
    rng = np.random.default_rng(cfg.seed)
    exclude = list(cfg.exclude)
    molecules = forest.load_forest_molecules(cfg.catalog, exclude=exclude)
    if "CH3OH" not in molecules:
        raise ValueError(f"CH3OH (the window's and the columns' reference) is missing or excluded "
                         f"(--exclude {' '.join(exclude)}, --catalog {cfg.catalog})")  # fmt: skip
    lo, hi = (1e3 * f for f in forest.BANDS_GHZ[cfg.band])
    centre = forest.strong_line_MHz(rng, molecules["CH3OH"], cfg.T_src_K, lo, hi)
    df = centre * cfg.chan_kms / lte.C_KMS
    rest = centre + (np.arange(cfg.n_chan) - cfg.n_chan / 2) * df
    obs = rest / (1.0 + cfg.v_lsr_kms / lte.C_KMS)
    maps = truth_maps(cfg, molecules, rng)
    T_K = np.zeros((cfg.n_pix * cfg.n_pix, cfg.n_chan))
    for name, m in maps.items():
        T_K += lte.spectrum(rest, molecules[name], m.reshape(-1, 5))
    K_per_Jy = K_PER_JY / ((obs / 1e3) ** 2 * cfg.beam_arcsec**2)
    data = T_K.T.reshape(cfg.n_chan, cfg.n_pix, cfg.n_pix) / K_per_Jy[:, None, None]
    data = data + rng.normal(0.0, cfg.rms_mJy * 1e-3, data.shape)
    b, p, n = cfg.beam_arcsec / 3600, cfg.pix_arcsec / 3600, cfg.n_pix
    header = fits.Header()
    cards = dict(BUNIT="Jy/beam", BMAJ=b, BMIN=b, BPA=0.0, OBJECT="FOREST", CTYPE1="RA---SIN",
                 CRVAL1=248.0946, CDELT1=-p, CRPIX1=n / 2 + 0.5, CUNIT1="deg", CTYPE2="DEC--SIN",
                 CRVAL2=-24.4757, CDELT2=p, CRPIX2=n / 2 + 0.5, CUNIT2="deg", CTYPE3="FREQ",
                 CRVAL3=obs[0] * 1e6, CDELT3=(obs[1] - obs[0]) * 1e6, CRPIX3=1.0, CUNIT3="Hz",
                 SPECSYS="LSRK", RESTFRQ=centre * 1e6, RADESYS="ICRS")  # fmt: skip
    header.update(cards)
    header["VELO-LSR"] = (cfg.v_lsr_kms * 1e3, "[m/s] systemic velocity")
    header["HISTORY"] = f"made by forest_cube.py: {json_config(cfg)}"
    hdus = [fits.PrimaryHDU(data.astype(np.float32), header)]
    for name, m in maps.items():
        for k, param in enumerate(MAP_NAMES):
            hdus.append(fits.ImageHDU(m[..., k], name=f"TRUE_{name.upper()}_{param}"))
    fits.HDUList(hdus).writeto(cfg.out, overwrite=True)
    return maps


def json_config(cfg: Config) -> str:
    """The resolved configuration as one line (for the header)."""
    return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())


def config_parser(cls, positional=(), options=None, **parser_kw) -> argparse.ArgumentParser:
    """An argparse parser made from a Config dataclass (the same helper is in every script).

    One argument per field: the type from the annotation or the default, bools as --name /
    --no-name flags, lists as nargs="+", the help from the field's trailing comment and its
    continuation comment lines, then the default. Fields in `positional` are positional (lists
    take any number of words); `options` adds argparse keywords per field (choices, required).
    """
    helps, last = {}, None
    for line in inspect.getsource(cls).splitlines():
        field = re.match(r"    (\w+):[^#]*?(?:#\s*(.*))?$", line)
        more = re.match(r"\s*#\s*(.*)$", line)
        if more and last:
            helps[last] += " " + more[1]
        elif field and not line.lstrip().startswith(("@", "class", "def")):
            last, helps[field[1]] = field[1], field[2] or ""
    parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter,
                                     **parser_kw)  # fmt: skip
    types = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        kind = dict(type=types.get(name, type(default)))
        if isinstance(default, bool):
            kind = dict(action=argparse.BooleanOptionalAction)
        elif isinstance(default, list):
            elem = type(default[0]) if default else next(
                (t for k, t in types.items() if f"[{k}]" in str(f.type)), str)  # fmt: skip
            kind = dict(type=elem, nargs="*" if f.name in positional else "+")
        elif f.name in positional:
            kind["nargs"] = "?"
        kind.update((options or {}).get(f.name, {}))
        text = helps.get(f.name, "").replace("%", "%%")
        if f.name in positional:
            parser.add_argument(f.name, default=default, help=text, **kind)
        else:
            shown = " ".join(map(str, default)) or "none" if isinstance(default, list) else \
                repr(default) if default == "" else default  # fmt: skip
            text += "" if kind.get("required") else f" (default: {shown})"
            parser.add_argument(f"--{f.name}", default=default, help=text, **kind)
    return parser


def parse_config(argv) -> Config:
    """Config from the command line (config_parser): the command and output file, then options."""
    parser = config_parser(
        Config,
        positional=("command", "out"),
        options={"command": dict(choices=["cube"])},
        description=__doc__,
    )
    return Config(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    cfg = parse_config(argv)
    try:
        if not Path(cfg.out).parent.is_dir():
            raise FileNotFoundError(f"output folder {Path(cfg.out).parent} does not exist")
        maps = make_cube(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote={cfg.out} molecules={','.join(maps)} shape=({cfg.n_chan},{cfg.n_pix},{cfg.n_pix})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
