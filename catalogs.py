"""Molecular catalogues (docs/method.md §1): resolve a molecule's name to its lines, and fetch
CDMS/JPL entries; the command line `python catalogs.py fetch` / `info`.

`load_molecule` finds an entry by name (or tag, or path) in a catalogue folder of `.cat` files,
an XCLASS or Splatalogue sqlite file, or the bundled data/ folder and the cache of `fetch`, and
returns a `Molecule`: line frequencies, Einstein A, g_u, E_low, E_up and the partition-function
table. The file formats are read by catalog_files.py (SPCAT, partition tables; a leaf) and
sqlite_catalogs.py (XCLASS, Splatalogue); their public names are re-exported here, so
`catalogs.read_cat` and the like keep working. lte.py computes spectra from the Molecule.

    import catalogs
    mol = catalogs.load_molecule("CH3OH")                  # bundled CDMS 032504
    mol = catalogs.load_molecule("CH3CN", "../shared/data/catalogs")  # a folder of .cat files

    python catalogs.py fetch CH3CN       # download a CDMS/JPL entry into the cache (online)
    python catalogs.py info CH3OH --freq 232000:233000
"""

import argparse
import dataclasses
import datetime
import hashlib
import inspect
import json
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from catalog_files import (  # noqa: F401  (re-exported: catalogs.X is the public API)
    DATA_DIR,
    H_OVER_K_K_PER_MHZ,
    HC_OVER_K_K_CM,
    Molecule,
    _q_for_cat,
    _tables_in,
    _unknown,
    einstein_A_from_lgint,
    log10_partition,
    make_molecule,
    molecule_from_cat,
    read_cat,
    read_partition_tables,
    read_q_file,
)
from sqlite_catalogs import (  # noqa: F401  (re-exported)
    SPLAT_LISTS,
    _is_splatalogue,
    formula_composition,
    read_splatalogue,
    read_xclass,
)

CACHE_DIR = Path(os.environ.get("SPECTUNER_CACHE", Path.home() / ".cache" / "spectuner_d1"))
CDMS_URL = "https://cdms.astro.uni-koeln.de/classic/entries/"
JPL_URL = "https://spec.jpl.nasa.gov/ftp/pub/catalog/"


@dataclasses.dataclass
class Config:
    command: str = "info"  # fetch (a CDMS/JPL entry into the cache) or info (a molecule's lines)
    name: str = ""  # fetch: a CDMS/JPL name or tag; info: a name, tag or catalogue file
    cache: str = ""  # fetch: cache folder ("" = $SPECTUNER_CACHE or ~/.cache/spectuner_d1)
    cdms_url: str = CDMS_URL  # fetch: the CDMS entries
    jpl_url: str = JPL_URL  # fetch: the JPL entries and catdir.cat
    catalog: str = ""  # info: where the name resolves (a .cat file, a folder of them, an XCLASS
    # or Splatalogue sqlite file; "" = the bundled data/ folder, then the cache of fetch)
    freq: str = ""  # info: LO:HI rest-frequency range [MHz] ("" = every line)


def select_lines(mol: Molecule, freq_min_MHz: float, freq_max_MHz: float) -> Molecule:
    """The lines of `mol` with rest frequency in [freq_min_MHz, freq_max_MHz] (a new Molecule)."""
    cut = slice(*mol.freq_MHz.searchsorted((freq_min_MHz, freq_max_MHz)).tolist())
    return Molecule(mol.name, mol.freq_MHz[cut], mol.A_s[cut], mol.g_u[cut], mol.E_low_K[cut],
                    mol.E_up_K[cut], mol.Q_T_K, mol.log10_Q, mol.source)  # fmt: skip


# --- resolving a name to a catalogue entry ---


def _folder_entries(folder: Path, tables: dict) -> list:
    """[(names, cat_path, tag)] for every c<tag>*.cat(.gz) under folder, named by `tables`."""
    index = folder / "index.json"
    fetched = json.loads(index.read_text()) if index.exists() else {}
    entries = []
    for path in sorted(folder.rglob("c*.cat*")):
        m = re.fullmatch(r"c(\d{6})(.*?)\.cat(\.gz)?", path.name)
        if not m:
            continue
        tag = int(m.group(1))
        names = {m.group(1), str(tag)}
        names |= {t for t in m.group(2).strip("_-").split("_") if re.search("[A-Za-z]", t)}
        for label in [tables.get(tag, ("",))[0], fetched.get(m.group(1), {}).get("name", "")]:
            if label:
                names |= {label, label.split(",")[0].strip()}
        names.discard("subset")
        entries.append((names, path, tag))
    return entries


def _from_folder(name: str, folder: Path) -> Molecule:
    """The entry called `name` in a catalogue folder; several: a full entry before a subset, then
    the largest file."""
    tables = _tables_in(*dict.fromkeys([folder, DATA_DIR]))  # the folder's own tables first
    entries = _folder_entries(folder, tables)
    hits = [e for e in entries if name in e[0]] or [
        e for e in entries if name.lower() in {n.lower() for n in e[0]}
    ]
    if not hits:
        raise ValueError(_unknown(name, {n for e in entries for n in e[0]}, folder))
    names, path, tag = max(hits, key=lambda e: ("subset" not in e[1].name, e[1].stat().st_size))
    T, q = _q_for_cat(path, tag, tables)
    return molecule_from_cat(path, T, q, name=name)


def _looks_like_path(name: str) -> bool:
    """A catalogue file name, or a path in an existing folder (names such as 'SO2, v2=0/1'
    hold a slash too)."""
    folder = Path(name).parent
    return bool(re.search(r"\.(cat|gz|db|sqlite3?)$", name)) or (
        folder.name != "" and folder.is_dir()
    )


def load_molecule(name_or_path, catalog=None, freq_range_MHz=None) -> Molecule:
    """Load a molecule's transitions and partition function (docs/method.md §1).

    Args:
        name_or_path: a bare name ('CH3OH', a CDMS/JPL name such as 'CO, v=0', a tag '032504',
            an XCLASS entry 'CH3OH;v=0;') or the path of a `.cat` file.
        catalog: where to resolve a name: a `.cat` file, a folder of them (searched
            recursively, with partfunc/catdir tables or q files), an XCLASS sqlite file, or a
            Splatalogue sqlite file (tables `species`, `main`; see `read_splatalogue`).
            None: the bundled data/ folder, then the cache of `python catalogs.py fetch`.
        freq_range_MHz: (lo, hi) rest-frequency range to keep, or None for all lines.
    Returns:
        Molecule.
    Raises:
        ValueError: unknown name (the message lists the closest names), unreadable catalogue.
        FileNotFoundError: `catalog` does not exist.
    """
    name = str(name_or_path)
    if catalog is None and Path(name).is_file():
        catalog, name = Path(name), None
    elif catalog is None and _looks_like_path(name):
        raise FileNotFoundError(f"catalogue file {name} not found")
    if catalog is not None:
        catalog = Path(catalog)
        if not catalog.exists():
            raise FileNotFoundError(
                f"catalog {catalog} does not exist "
                "(expected a .cat file, a folder of them, or an XCLASS or Splatalogue sqlite file)"
            )
        if catalog.is_dir():
            mol = _from_folder(name, catalog)
        elif catalog.suffix in (".db", ".sqlite", ".sqlite3") and _is_splatalogue(catalog):
            mol = read_splatalogue(catalog, name)
        elif catalog.suffix in (".db", ".sqlite", ".sqlite3"):
            mol = read_xclass(catalog, name)
        else:
            tag = read_cat(catalog)["tag"]
            T, q = _q_for_cat(catalog, tag, _tables_in(catalog.parent, DATA_DIR))
            mol = molecule_from_cat(catalog, T, q, name=name or catalog.stem)
    else:
        try:
            mol = _from_folder(name, DATA_DIR)
        except ValueError:
            if not (CACHE_DIR / "index.json").exists():
                raise
            mol = _from_folder(name, CACHE_DIR)
    if freq_range_MHz is not None:
        lo, hi = freq_range_MHz
        if not lo < hi:
            raise ValueError(f"freq_range_MHz=({lo}, {hi}): expected lo < hi")
        mol = select_lines(mol, lo, hi)
    return mol


# --- fetching entries (online users) ---


def fetch(name_or_tag: str, cache=CACHE_DIR, cdms_url=CDMS_URL, jpl_url=JPL_URL, timeout_s=20.0):
    """Download a CDMS or JPL entry into the cache, with its partition function, so that its name
    then resolves in `load_molecule`. Records URL, date and SHA-256 in cache/index.json.

    The CDMS partition function comes from the bundled CDMS table (data/cdms_partfunc.cat);
    the JPL one from the server's catdir.cat, so Q and g_u are always from one catalogue.
    Raises:
        ValueError: unknown name. ConnectionError: the server cannot be reached (offline).
    """
    tables = _tables_in(DATA_DIR)
    text = str(name_or_tag).strip()
    tag = _tag_of(text, tables)
    is_cdms = (tag // 100) % 10 == 5  # CDMS tags are xx5xx, JPL tags xx0xx
    base = cdms_url if is_cdms else jpl_url
    url = f"{base.rstrip('/')}/c{tag:06d}.cat"
    body = _download(url, timeout_s, cache)
    if is_cdms:
        T, q = (tables[tag][1], tables[tag][2]) if tag in tables else (None, None)
    else:
        tmp = Path(cache) / "jpl_catdir.cat"
        Path(cache).mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(_download(f"{jpl_url.rstrip('/')}/catdir.cat", timeout_s, cache))
        entry = read_partition_tables(tmp).get(tag)
        T, q = (entry[1], entry[2]) if entry else (None, None)
    if T is None or len(T) < 2:
        raise ValueError(
            f"tag {tag:06d}: no partition function in the {'CDMS' if is_cdms else 'JPL'} table"
        )
    name = tables.get(tag, (text,))[0] if not text.isdigit() or tag in tables else text
    return _store_entry(Path(cache), tag, body, (T, q), "CDMS" if is_cdms else "JPL", name, url)


def _tag_of(text: str, tables: dict) -> int:
    """The catalogue tag of a tag string or a CDMS/JPL name (with or without its state label).

    Raises:
        ValueError: an unknown name (closest listed), or one that names several entries.
    """
    if text.isdigit():
        return int(text)
    hits = [t for t, (n, _, _) in tables.items() if text in (n, n.split(",")[0].strip())]
    if len(hits) != 1:
        choices = [tables[t][0] for t in hits] if hits else None
        raise ValueError(
            f"'{text}' names {len(hits)} entries {choices or ''}; give a tag"
            if hits
            else _unknown(text, [n for n, _, _ in tables.values()], "CDMS/JPL tables")
        )
    return hits[0]


def _download(url: str, timeout_s: float, cache) -> bytes:
    """The body at url. Raises: ConnectionError: it cannot be reached (nothing is written)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.read()
    except (urllib.error.URLError, OSError) as err:
        raise ConnectionError(
            f"cannot download {url}: {err} (offline? nothing was written to {cache})"
        )


def _store_entry(cache: Path, tag: int, body: bytes, T_q: tuple, source: str, name: str,
                 url: str) -> Path:  # fmt: skip
    """Write the entry c{tag}.cat, its partition function q_{tag}.txt (T_K, log10 Q) and its
    record (name, url, SHA-256, date) in cache/index.json; the path of the entry."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"c{tag:06d}.cat").write_bytes(body)
    np.savetxt(cache / f"q_{tag:06d}.txt", np.c_[T_q[0], T_q[1]], header=f"T_K log10Q ({source})")
    index_path = cache / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    index[f"{tag:06d}"] = {
        "name": name,
        "url": url,
        "sha256": hashlib.sha256(body).hexdigest(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    index_path.write_text(json.dumps(index, indent=1))
    return cache / f"c{tag:06d}.cat"


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


def parse_config(argv: list[str] | None = None) -> Config:
    """Config from the command line (config_parser); bad input ends with `error: ...`, exit 2."""
    parser = config_parser(Config, positional=("command", "name"), description=__doc__,
                           options={"command": dict(choices=("fetch", "info"), nargs=None),
                                    "name": dict(nargs=None)})  # fmt: skip
    cfg = Config(**vars(parser.parse_args(argv)))
    of = dict(cache="fetch", cdms_url="fetch", jpl_url="fetch", catalog="info", freq="info")
    for key, command in of.items():  # an option of the other command
        if getattr(cfg, key) != getattr(Config, key) and cfg.command != command:
            parser.error(f"--{key}: only for {command}, not {cfg.command}")
    return cfg


def main(argv=None) -> int:
    """`python catalogs.py fetch NAME_OR_TAG` or `python catalogs.py info NAME [--catalog PATH]`."""
    cfg = parse_config(argv)
    try:
        if cfg.command == "fetch":
            path = fetch(cfg.name, cfg.cache or CACHE_DIR, cfg.cdms_url, cfg.jpl_url)
            print(f"fetched={path}")
        else:
            try:
                rng = tuple(float(x) for x in cfg.freq.split(":")) if cfg.freq else None
            except ValueError:
                rng = ()
            if rng is not None and len(rng) != 2:
                raise ValueError(f"--freq {cfg.freq}: expected LO:HI in MHz, e.g. 232000:233000")
            mol = load_molecule(cfg.name, cfg.catalog or None, rng)
            q300 = float(mol.Q(300.0))
            print(f"name={mol.name} lines={mol.freq_MHz.size} Q300={q300:.6g} source={mol.source}")
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
