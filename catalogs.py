"""Molecular catalogues (docs/method.md §1): read, resolve and fetch the lines of a molecule.

Reads SPCAT `.cat` entries (CDMS, JPL) with their partition functions, the XCLASS/CDMS sqlite
layout and Splatalogue sqlite rows (paired with CDMS/JPL partition functions by tag), into a
`Molecule`: line frequencies, Einstein A, g_u, E_low, E_up and the partition-function table. A
leaf module (numpy, sqlite3 and the standard library); lte.py computes spectra from it.

    import catalogs
    mol = catalogs.load_molecule("CH3OH")                  # bundled CDMS 032504
    mol = catalogs.load_molecule("CH3CN", "../shared/data/catalogs")  # a folder of .cat files

    python catalogs.py fetch CH3CN       # download a CDMS/JPL entry into the cache (online)
    python catalogs.py info CH3OH --freq 232000:233000
"""

import argparse
import datetime
import difflib
import gzip
import hashlib
import json
import math
import os
import re
import sqlite3
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

H_OVER_K_K_PER_MHZ = 4.799243e-5  # h/k [K/MHz]
HC_OVER_K_K_CM = 1.4387769  # hc/k [K cm]: E[K] = 1.4387769 E[cm^-1]
DATA_DIR = Path(__file__).resolve().parent / "data"
CACHE_DIR = Path(os.environ.get("SPECTUNER_CACHE", Path.home() / ".cache" / "spectuner_d1"))
CDMS_URL = "https://cdms.astro.uni-koeln.de/classic/entries/"
JPL_URL = "https://spec.jpl.nasa.gov/ftp/pub/catalog/"


@dataclass(frozen=True, eq=False)
class Molecule:
    """Transitions of one catalogue entry, sorted by frequency, and its partition function."""

    name: str
    freq_MHz: np.ndarray  # rest frequency (L,)
    A_s: np.ndarray  # Einstein A (L,) [s^-1]
    g_u: np.ndarray  # upper-state degeneracy (L,)
    E_low_K: np.ndarray  # lower-state energy (L,) [K]
    E_up_K: np.ndarray  # upper-state energy (L,) [K]
    Q_T_K: np.ndarray  # partition-function table temperatures (n,) [K], ascending
    log10_Q: np.ndarray  # log10 Q at Q_T_K (n,)
    source: str = ""  # file (and entry) the data came from

    def Q(self, T_K):
        """Partition function at T_K (docs/method.md §1: log Q linear in log T, end slopes
        beyond)."""
        return 10.0 ** log10_partition(np, T_K, self.Q_T_K, self.log10_Q)


# --- partition function and line strengths (docs/method.md §1) ---


def log10_partition(xp, T_K, table_T_K, table_log10_Q):
    """log10 Q(T) interpolated linearly in log10 T; beyond the table, the end segment's slope.

    Args:
        xp: `numpy` or `torch` (the array namespace of T_K and the tables).
        T_K: temperatures [K], any shape. table_T_K, table_log10_Q: (n,) ascending in T.
    Returns:
        log10 Q with the shape of T_K.
    """
    x_tab = xp.log10(table_T_K)
    x = xp.log10(T_K)
    i = xp.clip(xp.searchsorted(x_tab, x) - 1, 0, len(x_tab) - 2)
    slope = (table_log10_Q[i + 1] - table_log10_Q[i]) / (x_tab[i + 1] - x_tab[i])
    return table_log10_Q[i] + slope * (x - x_tab[i])


def einstein_A_from_lgint(freq_MHz, lgint, g_u, E_low_K, Q300):
    """Einstein A [s^-1] from the SPCAT log10 intensity at 300 K (CDMS; docs/method.md §1)."""
    E_up_K = E_low_K + H_OVER_K_K_PER_MHZ * freq_MHz
    boltz = np.exp(-E_low_K / 300.0) - np.exp(-E_up_K / 300.0)
    return 2.7964e-16 * 10.0**lgint * freq_MHz**2 * Q300 / (g_u * boltz)


def select_lines(mol: Molecule, freq_min_MHz: float, freq_max_MHz: float) -> Molecule:
    """The lines of `mol` with rest frequency in [freq_min_MHz, freq_max_MHz] (a new Molecule)."""
    i0, i1 = np.searchsorted(mol.freq_MHz, [freq_min_MHz, freq_max_MHz])
    cut = slice(int(i0), int(i1))
    return Molecule(
        mol.name,
        mol.freq_MHz[cut],
        mol.A_s[cut],
        mol.g_u[cut],
        mol.E_low_K[cut],
        mol.E_up_K[cut],
        mol.Q_T_K,
        mol.log10_Q,
        mol.source,
    )


# --- catalogue readers (docs/method.md §1) ---


def _open_text(path: Path):
    """Open a text file, gzip-compressed when its name ends in .gz."""
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _decode_gup(field: str) -> int:
    """SPCAT GUP (I3): values above 999 code the hundreds as a letter, 'A' = 10, 'B' = 11, ..."""
    field = field.strip()
    if field[:1].isalpha():
        return (ord(field[0].upper()) - ord("A") + 10) * 100 + int(field[1:] or 0)
    return int(field)


def read_cat(path) -> dict:
    """Read an SPCAT `.cat` (or `.cat.gz`) file: FREQ, ERR, LGINT, DR, ELO, GUP, TAG (method §1).

    Returns:
        dict of arrays freq_MHz, lgint, E_low_cm, g_u and the int `tag` (absolute value).
    Raises:
        ValueError: a line that does not parse, naming file:line.
    """
    path = Path(path)
    cols = {"freq_MHz": [], "lgint": [], "E_low_cm": [], "g_u": []}
    tag = None
    with _open_text(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = (float(line[0:13]), float(line[21:29]), float(line[31:41]))
                gup, line_tag = _decode_gup(line[41:44]), abs(int(line[44:51]))
            except ValueError as err:
                raise ValueError(f"{path}:{n}: not an SPCAT catalogue line ({err}): {line!r}")
            for key, value in zip(cols, (*row, gup)):
                cols[key].append(value)
            tag = line_tag if tag is None else tag
    if tag is None:
        raise ValueError(f"{path}: no catalogue lines")
    return {**{k: np.asarray(v, dtype=float) for k, v in cols.items()}, "tag": tag}


def read_partition_tables(path) -> dict:
    """Partition functions by tag from a CDMS `partfunc.cat`, a JPL `catdir.cat`, or a CDMS
    `catdir.cat` (names only).

    Returns:
        {tag: (name, T_K (n,), log10_Q (n,))}; T_K empty where the file has names only.
    """
    path = Path(path)
    with _open_text(path) as fh:
        text = fh.read().splitlines()
    out = {}
    if text and text[0].lstrip().startswith("|"):  # pipe tables (astroquery's CDMS files)
        head = [h.strip() for h in text[0].strip().strip("|").split("|")]
        temps = [float(m.group(1)) for h in head if (m := re.match(r"lg\(Q\((.*)\)\)", h))]
        for line in text[1:]:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 2 or not cells[0].isdigit():
                continue
            logq = np.asarray(cells[3 : 3 + len(temps)], dtype=float) if temps else np.empty(0)
            ok = np.isfinite(logq)
            out[int(cells[0])] = (cells[1], np.asarray(temps)[ok] if temps else logq, logq[ok])
        return out
    jpl_T = np.array([300.0, 225.0, 150.0, 75.0, 37.5, 18.75, 9.375])
    for n, line in enumerate(text, 1):  # JPL catdir: I6, X, A13, I6, 7F7.4, ...
        if not line.strip():
            continue
        try:
            logq = np.array([float(line[26 + 7 * k : 33 + 7 * k] or "nan") for k in range(7)])
            out[int(line[0:6])] = (
                line[7:20].strip(),
                jpl_T[np.isfinite(logq)],
                logq[np.isfinite(logq)],
            )
        except ValueError as err:
            raise ValueError(f"{path}:{n}: not a catdir line ({err}): {line!r}")
    return out


def read_q_file(path) -> tuple:
    """A two-column partition-function file: T [K] and Q, or log10 Q if a comment says 'log'.

    Returns:
        (T_K (n,), log10_Q (n,)) sorted by temperature.
    """
    path = Path(path)
    with _open_text(path) as fh:
        lines = fh.read().splitlines()
    is_log = any(line.lstrip().startswith("#") and "log" in line.lower() for line in lines)
    try:
        data = np.loadtxt(lines, comments="#", ndmin=2)[:, :2]
    except ValueError as err:
        raise ValueError(f"{path}: expected two columns T_K and Q (or log10 Q): {err}")
    order = np.argsort(data[:, 0])
    T, q = data[order, 0], data[order, 1]
    return T, (q if is_log else np.log10(q))


def make_molecule(name, freq_MHz, A_s, g_u, E_low_K, Q_T_K, log10_Q, source="") -> Molecule:
    """A Molecule from raw arrays: sorted by frequency, E_up derived, Q table sorted by T."""
    order = np.argsort(freq_MHz, kind="stable")
    f, E_low = np.asarray(freq_MHz, float)[order], np.asarray(E_low_K, float)[order]
    qo = np.argsort(Q_T_K)
    if len(qo) < 2:
        raise ValueError(f"{name}: the partition function needs at least 2 temperatures")
    return Molecule(
        name,
        f,
        np.asarray(A_s, float)[order],
        np.asarray(g_u, float)[order],
        E_low,
        E_low + H_OVER_K_K_PER_MHZ * f,
        np.asarray(Q_T_K, float)[qo],
        np.asarray(log10_Q, float)[qo],
        source,
    )


def molecule_from_cat(cat_path, Q_T_K, log10_Q, name=None) -> Molecule:
    """A Molecule from an SPCAT file and the partition function of the same catalogue."""
    cat = read_cat(cat_path)
    E_low_K = HC_OVER_K_K_CM * cat["E_low_cm"]
    Q300 = 10.0 ** log10_partition(
        np, 300.0, np.sort(Q_T_K), np.asarray(log10_Q)[np.argsort(Q_T_K)]
    )
    A = einstein_A_from_lgint(cat["freq_MHz"], cat["lgint"], cat["g_u"], E_low_K, Q300)
    return make_molecule(
        name or str(cat["tag"]),
        cat["freq_MHz"],
        A,
        cat["g_u"],
        E_low_K,
        Q_T_K,
        log10_Q,
        str(cat_path),
    )


def read_xclass(db_path, name: str) -> Molecule:
    """A Molecule from the XCLASS/CDMS sqlite layout (tables Transitions, Partitionfunctions).

    `name` is an entry such as 'CH3OH;v=0;', or a bare 'CH3OH': all its entries, joined when
    they share one partition function (as the vibrational states of one CDMS entry do).
    """
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        names = [r[0] for r in con.execute("SELECT DISTINCT PF_Name FROM Partitionfunctions")]
        picked = [name] if name in names else [n for n in names if n.split(";")[0] == name]
        if not picked:
            raise ValueError(_unknown(name, names, db_path))
        cols = [r[1] for r in con.execute("PRAGMA table_info(Partitionfunctions)")]
        t_cols = [c for c in cols if re.fullmatch(r"PF_\d+_\d+", c)]
        T = np.array([float(c[3:].replace("_", ".")) for c in t_cols])
        sel = ", ".join(t_cols)
        qs = [
            con.execute(f"SELECT {sel} FROM Partitionfunctions WHERE PF_Name=?", (n,)).fetchone()
            for n in picked
        ]
        Q = np.array(qs, dtype=float)
        if not np.allclose(Q, Q[0], rtol=1e-6, equal_nan=True):
            raise ValueError(
                f"{db_path}: '{name}' matches entries with different partition functions; "
                f"pick one of {picked}"
            )
        rows = []
        for n in picked:
            rows += con.execute(
                "SELECT T_Frequency, T_EinsteinA, T_UpperStateDegeneracy, T_EnergyLower "
                "FROM Transitions WHERE T_Name=?",
                (n,),
            ).fetchall()
    finally:
        con.close()
    arr = np.array(rows, dtype=float).reshape(-1, 4)
    ok = np.isfinite(Q[0]) & (Q[0] > 0)
    return make_molecule(
        name,
        arr[:, 0],
        arr[:, 1],
        arr[:, 2],
        HC_OVER_K_K_CM * arr[:, 3],
        T[ok],
        np.log10(Q[0][ok]),
        f"{db_path}:{';'.join(picked)}",
    )


# --- Splatalogue sqlite (the casadata/CASA layout: tables `species` and `main`) ---

SPLAT_LISTS = {10: "CDMS", 12: "JPL", 11: "Lovas/NIST", 14: "SLAIM"}  # main.ll_id
_ISOTOPE_TOKEN = re.compile(r"(?:\((\d+)\))?([A-Z][a-z]?)(?:-(\d+)-?)?(\d*)|(\+)")


def formula_composition(name: str, ordered: bool = False) -> tuple:
    """Atoms of a species name, isotopes kept, as a sorted tuple of ((element, mass), count),
    or with `ordered` the written sequence of (element, mass, count) groups.

    Reads both notations: CDMS/JPL 'HCC-13-CN, v=0' and Splatalogue 'HC(13)CCN v7=1' give the
    same composition (and sequence); a prefix such as 'cis-', 't-', 'c-' and the state label are
    dropped.
    """
    base = re.split(r"[ ,]", name.strip(), maxsplit=1)[0]
    base = re.sub(r"^[a-z]+'?-", "", base)
    atoms: dict = {}
    groups = []
    for iso_pre, element, iso_post, count, charge in _ISOTOPE_TOKEN.findall(base):
        key = ("+", "") if charge else (element, iso_pre or iso_post)
        atoms[key] = atoms.get(key, 0) + (int(count) if count else 1)
        groups.append((*key, int(count) if count else 1))
    return tuple(groups) if ordered else tuple(sorted(atoms.items()))


def _splat_q300(con, species_id: int) -> float:
    """Q(300 K) implied by a species' rows: A, g_u and E_low against the catalogue's log10
    intensity at 300 K (the inverse of `einstein_A_from_lgint`); NaN without intensities."""
    rows = con.execute(
        "SELECT orderedfreq, intintensity, aij, upper_state_degeneracy, lower_state_energy_K "
        "FROM main WHERE species_id=? AND typeof(intintensity) IN ('real', 'integer') "
        "AND typeof(aij) IN ('real', 'integer') LIMIT 200",
        (species_id,),
    ).fetchall()
    if not rows:
        return math.nan
    f, lgint, log10_A, g_u, E_low = np.array(rows, dtype=float).T
    a_unit = einstein_A_from_lgint(f, lgint, g_u, E_low, 1.0)
    return float(np.median(10.0**log10_A / a_unit))


def _splat_tag(s_name: str, splat_id: str, ll_id: int, q300: float, tables: dict) -> int:
    """The CDMS or JPL tag of a Splatalogue species: same mass (SPLAT_ID[:3]), same catalogue
    (CDMS tags xx5xx, JPL xx0xx), same composition; among several, those written in the same
    atom order (isotopomers: 'HC(13)CCN' is 'HCC-13-CN'), then the Q(300) nearest q300."""
    mass, cdms = int(splat_id[:3]), ll_id == 10
    comp, order = formula_composition(s_name), formula_composition(s_name, True)
    hits = [
        t
        for t, (n, T, _) in tables.items()
        if t // 1000 == mass and ((t // 100) % 10 == 5) == cdms and len(T) >= 2
        and formula_composition(n) == comp
    ]  # fmt: skip
    if not hits:
        raise ValueError(
            f"Splatalogue species '{s_name}' ({SPLAT_LISTS[ll_id]}): no {SPLAT_LISTS[ll_id]} "
            f"partition function of mass {mass} and the same atoms"
        )

    same_order = [t for t in hits if formula_composition(tables[t][0], True) == order]
    hits = same_order or hits

    def misfit(t):
        T, q = tables[t][1], tables[t][2]
        o = np.argsort(T)
        return abs(float(log10_partition(np, 300.0, T[o], q[o])) - math.log10(q300))

    return min(hits, key=misfit) if math.isfinite(q300) else hits[0]


def read_splatalogue(db_path, name: str, tables: dict | None = None) -> Molecule:
    """A Molecule from Splatalogue rows (sqlite with tables `species` and `main`, as in CASA's
    casadata), paired with the partition function of the same catalogue by tag (docs/method.md §1).

    `name` is a Splatalogue species ('CH2CHCN v=0', also without parentheses '13CH3CN'), a bare
    formula ('CH2CHCN': its CDMS/JPL states that resolve to one tag, joined), or a CDMS/JPL
    catalogue name ('C2H3CN', 'C2H5OH'). Rows carry f, log10 A, g_u and E_low; the tag is found
    by `_splat_tag`, and Q(T) is the tag's table (bundled data/ by default) scaled to the Q(300)
    that the rows' own 300 K intensities imply, so that g_u and Q follow one convention (the
    source string gives the factor). SLAIM and Lovas rows have no partition function: a name
    with only those raises, and a bare name skips them.

    Raises:
        ValueError: unknown name (closest names listed), or no CDMS/JPL rows for it.
    """
    tables = _tables_in(DATA_DIR) if tables is None else tables
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        picked, slaim = _splat_species(con, db_path, name)
        tag, members = _splat_one_tag(con, db_path, name, picked, tables)
        ids = [m[0] for m in members]
        rows = con.execute(
            "SELECT orderedfreq, aij, upper_state_degeneracy, lower_state_energy_K FROM main "
            f"WHERE species_id IN ({','.join('?' * len(ids))})",
            ids,
        ).fetchall()
    finally:
        con.close()
    return _splat_molecule(db_path, name, rows, tag, members, slaim, tables)


def _splat_species(con, db_path, name: str) -> tuple[list, list]:
    """The CDMS/JPL species rows (species_id, s_name, s_name_noparens, SPLAT_ID, ll_id) that
    `name` picks, and the names of the SLAIM/Lovas ones it also picks (skipped: no Q).

    Raises:
        ValueError: unknown name (closest names listed), or only SLAIM/Lovas rows.
    """
    species = con.execute(
        "SELECT species_id, s_name, s_name_noparens, SPLAT_ID FROM species"
    ).fetchall()

    def with_list(rows):  # append each species' ll_id (one species, one line list)
        q = "SELECT ll_id FROM main WHERE species_id=? LIMIT 1"
        return [(*r, (con.execute(q, (r[0],)).fetchone() or (None,))[0]) for r in rows]

    picked = [r for r in species if name in (r[1], r[2])]
    if not picked:
        picked = [r for r in species if name in (r[1].split(" ")[0], r[2].split(" ")[0])]
    picked = with_list(picked)
    slaim = [r[1] for r in picked if r[4] not in (10, 12)]
    picked = [r for r in picked if r[4] in (10, 12)]
    if not picked and not slaim:  # a CDMS/JPL name: the species of that tag
        comp = formula_composition(name)
        picked = with_list([r for r in species if formula_composition(r[1]) == comp])
        picked = [r for r in picked if r[4] in (10, 12)]
    if not picked:
        if slaim:
            raise ValueError(
                f"{db_path}: '{name}' has only SLAIM or Lovas rows {slaim}, which carry no "
                "partition function; use a CDMS/JPL entry"
            )
        raise ValueError(_unknown(name, [r[1] for r in species], db_path))
    return picked, slaim


def _splat_one_tag(con, db_path, name: str, picked: list, tables: dict) -> tuple[int, list]:
    """(tag, [(species_id, s_name, q300), ...]): the one catalogue tag of the picked species
    (_splat_tag; those whose tag's catalogue name is `name` first) and its species.

    Raises:
        ValueError: the species belong to several tags.
    """
    tagged = {}
    for sid, s_name, _, splat_id, ll in picked:
        q300 = _splat_q300(con, sid)
        tag = _splat_tag(s_name, splat_id, ll, q300, tables)
        tagged.setdefault(tag, []).append((sid, s_name, q300))
    named = {t: v for t, v in tagged.items() if tables[t][0].split(",")[0] == name}
    tagged = named or tagged
    if len(tagged) > 1:
        raise ValueError(
            f"{db_path}: '{name}' matches species of several catalogue tags "
            f"{ {t: [s[1] for s in v] for t, v in tagged.items()} }; name one of them"
        )
    ((tag, members),) = tagged.items()
    return tag, members


def _splat_molecule(db_path, name, rows, tag, members, slaim, tables) -> Molecule:
    """The Molecule of the rows (f, log10 A, g_u, E_low) with the tag's Q(T) table scaled to
    the median Q(300) that the species' rows imply."""
    arr = np.array(rows, dtype=float).reshape(-1, 4)
    arr = arr[np.isfinite(arr).all(axis=1)]
    T, q = tables[tag][1], tables[tag][2]
    o = np.argsort(T)
    q300 = np.nanmedian([m[2] for m in members])
    shift = math.log10(q300) - float(log10_partition(np, 300.0, T[o], q[o]))
    shift = shift if math.isfinite(shift) else 0.0
    label = ";".join(m[1] for m in members)
    return make_molecule(
        name,
        arr[:, 0],
        10.0 ** arr[:, 1],
        arr[:, 2],
        arr[:, 3],
        T,
        q + shift,
        f"{db_path}:{label} (tag {tag:06d} {tables[tag][0]}, Q x {10**shift:.4g}"
        + (f"; skipped without Q: {slaim})" if slaim else ")"),
    )


def _is_splatalogue(db_path) -> bool:
    """True if the sqlite file has Splatalogue's `main` table (column orderedfreq)."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        cols = [r[1] for r in con.execute("PRAGMA table_info(main)")]
    finally:
        con.close()
    return "orderedfreq" in cols


# --- resolving a name to a catalogue entry ---


def _unknown(name, known, where) -> str:
    """The message for an unknown molecule name, with the closest known names (not the numeric
    catalogue tags, unless a tag was asked for)."""
    known = sorted({str(k) for k in known})
    names = known if str(name).strip().isdigit() else [k for k in known if not k.isdigit()]
    close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.4)
    return f"unknown molecule '{name}' in {where}; closest names: {close or names[:10]}"


def _tables_in(*folders: Path) -> dict:
    """Partition tables by tag from every partfunc/catdir file under the folders, in order: the
    first row with Q for a tag wins; name-only rows (a CDMS catdir) fill the gaps."""
    tables = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.cat*")):
            if re.search(r"partfunc|catdir", path.name):
                for tag, (name, T, q) in read_partition_tables(path).items():
                    if tag not in tables or (len(T) and not len(tables[tag][1])):
                        tables[tag] = (name, T, q)
    return tables


def _q_for_cat(cat: Path, tag: int, tables: dict):
    """The partition function of a .cat entry from its own catalogue: a q file beside it with the
    same stem or tag, else the partition table of its catalogue (CDMS and JPL tags differ)."""
    for q in [cat.with_suffix(".qpart"), *sorted(cat.parent.glob(f"q_{tag:06d}*"))]:
        if q.exists():
            return read_q_file(q)
    if tag in tables and len(tables[tag][1]) >= 2:
        return tables[tag][1], tables[tag][2]
    raise ValueError(
        f"{cat}: no partition function for tag {tag:06d} (expected a .qpart or "
        f"q_{tag:06d}*.txt beside it, or a partfunc/catdir table)"
    )


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


def main(argv=None) -> int:
    """`python catalogs.py fetch NAME_OR_TAG` or `python catalogs.py info NAME [--catalog PATH]`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download a CDMS/JPL entry into the cache")
    f.add_argument("name_or_tag")
    f.add_argument("--cache", default=str(CACHE_DIR), help="cache folder")
    f.add_argument("--cdms_url", default=CDMS_URL)
    f.add_argument("--jpl_url", default=JPL_URL)
    i = sub.add_parser("info", help="summarise a molecule's lines")
    i.add_argument("name")
    i.add_argument("--catalog", default=None)
    i.add_argument("--freq", default=None, help="LO:HI rest-frequency range [MHz]")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fetch":
            path = fetch(args.name_or_tag, args.cache, args.cdms_url, args.jpl_url)
            print(f"fetched={path}")
        else:
            rng = tuple(float(x) for x in args.freq.split(":")) if args.freq else None
            mol = load_molecule(args.name, args.catalog, rng)
            q300 = float(mol.Q(300.0))
            print(f"name={mol.name} lines={mol.freq_MHz.size} Q300={q300:.6g} source={mol.source}")
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
