"""Sqlite catalogues (docs/method.md §1): the XCLASS/CDMS layout and Splatalogue's, read into a
`catalog_files.Molecule`.

XCLASS/CDMS (tables `Transitions`, `Partitionfunctions`) carries its own partition functions.
Splatalogue (the casadata/CASA layout: tables `species` and `main`) carries none; each species is
paired by mass, catalogue and atoms with a CDMS or JPL tag, whose Q(T) table is scaled to the
Q(300 K) the species' rows imply (docs/forest.md). Imports catalog_files (numpy, sqlite3 and the
standard library besides); catalogs.py picks the reader from the file's tables.

    import sqlite_catalogs
    mol = sqlite_catalogs.read_xclass("cdms.sqlite", "CH3OH;v=0;")
    mol = sqlite_catalogs.read_splatalogue("splatalogue.sqlite", "HNCO v=0")
"""

import math
import re
import sqlite3

import numpy as np

from catalog_files import (
    DATA_DIR,
    HC_OVER_K_K_CM,
    Molecule,
    _tables_in,
    _unknown,
    einstein_A_from_lgint,
    log10_partition,
    make_molecule,
)

# --- XCLASS / CDMS sqlite (tables `Transitions` and `Partitionfunctions`) ---


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
