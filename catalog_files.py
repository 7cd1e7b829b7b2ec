"""Catalogue files (docs/method.md §1): SPCAT `.cat` entries, partition-function tables and q
files, read into a `Molecule`.

A `Molecule` holds one entry's line frequencies, Einstein A, g_u, E_low, E_up and its partition
function table. Read top to bottom: the `Molecule`; the partition function and the Einstein A of
an SPCAT intensity; the readers of `.cat` (CDMS, JPL), `partfunc.cat`/`catdir.cat` and two-column
q files; and the look-ups that pair an entry with its partition function. A leaf module (numpy
and the standard library). sqlite_catalogs.py reads the XCLASS and Splatalogue sqlite layouts,
catalogs.py resolves a name (`load_molecule`) and fetches entries.

    import catalog_files
    tables = catalog_files.read_partition_tables("data/cdms_partfunc.cat.gz")  # {tag: ...}
    T, q = tables[32504][1:]
    mol = catalog_files.molecule_from_cat("data/c032504.cat.gz", T, q, name="CH3OH")
"""

import difflib
import gzip
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

H_OVER_K_K_PER_MHZ = 4.799243e-5  # h/k [K/MHz]
HC_OVER_K_K_CM = 1.4387769  # hc/k [K cm]: E[K] = 1.4387769 E[cm^-1]
DATA_DIR = Path(__file__).resolve().parent / "data"  # the bundled catalogue entries and tables


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
    if xp is np and isinstance(T_K, float):  # one temperature (a float or np.float64): floats
        x = float(np.log10(T_K))
        i = min(max(int(x_tab.searchsorted(x)) - 1, 0), len(x_tab) - 2)
        (x0, x1), (q0, q1) = x_tab[i : i + 2].tolist(), table_log10_Q[i : i + 2].tolist()
        return q0 + (q1 - q0) / (x1 - x0) * (x - x0)
    x = xp.log10(T_K)
    i = xp.searchsorted(x_tab, x) - 1
    i = np.minimum(np.maximum(i, 0), len(x_tab) - 2) if xp is np else xp.clip(i, 0, len(x_tab) - 2)
    slope = (table_log10_Q[i + 1] - table_log10_Q[i]) / (x_tab[i + 1] - x_tab[i])
    return table_log10_Q[i] + slope * (x - x_tab[i])


def einstein_A_from_lgint(freq_MHz, lgint, g_u, E_low_K, Q300):
    """Einstein A [s^-1] from the SPCAT log10 intensity at 300 K (CDMS; docs/method.md §1)."""
    E_up_K = E_low_K + H_OVER_K_K_PER_MHZ * freq_MHz
    boltz = np.exp(-E_low_K / 300.0) - np.exp(-E_up_K / 300.0)
    return 2.7964e-16 * 10.0**lgint * freq_MHz**2 * Q300 / (g_u * boltz)


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


# --- look-ups shared by the readers and catalogs.load_molecule ---


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
