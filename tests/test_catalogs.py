"""Splatalogue rows as a catalogue of lte.load_molecule (issue 11)."""

import numpy as np
import pytest

import catalogs
import lte

SPLAT = "catalogs/splatalogue/splatalogue_casadata2025_hotcore_subset_60-370GHz.sqlite"


def test_splatalogue_line_and_q_by_tag(shared_data):
    db = shared_data / SPLAT
    mol = lte.load_molecule("CH3CH2CN v=0", catalog=db)
    # a row of table main (ll_id 12 = JPL): 60028.4 MHz is the first line in the file's range
    i = np.argmin(np.abs(mol.freq_MHz - 60028.4))
    assert mol.freq_MHz.size == 7819 and abs(mol.freq_MHz[i] - 60028.4) < 0.1
    assert "tag 055001 C2H5CN" in mol.source  # JPL tag of ethyl cyanide, its JPL Q table
    jpl = catalogs.read_partition_tables(catalogs.DATA_DIR / "jpl_catdir.cat")[55001]
    q300 = 10 ** lte.log10_partition(np, 300.0, jpl[1][::-1], jpl[2][::-1])
    assert abs(mol.Q(300.0) / q300 - 1) < 0.01  # rows and table agree here (Q x 0.999)
    # the rows' own 300 K intensities are reproduced by A, g_u, E_low and Q(300)
    A = catalogs.einstein_A_from_lgint(mol.freq_MHz, -5.0, mol.g_u, mol.E_low_K, mol.Q(300.0))
    assert np.all(np.isfinite(A)) and np.all(mol.A_s > 0) and np.all(mol.g_u >= 1)


def test_splatalogue_cdms_and_names(shared_data):
    db = shared_data / SPLAT
    so2 = lte.load_molecule("SO2", catalog=db)  # ll_id 10: CDMS table, v=0 and v2=1 joined
    assert "tag 064502" in so2.source and "SO2 v2=1" in so2.source
    vinyl = lte.load_molecule("C2H3CN", catalog=db)  # a JPL name finds CH2CHCN by its tag
    assert "tag 053001" in vinyl.source and vinyl.freq_MHz.size > 10000
    assert catalogs.formula_composition("HCC-13-CN, v=0") == catalogs.formula_composition(
        "HCC(13)CN v7=1"
    )
    assert catalogs.formula_composition("OCS") != catalogs.formula_composition("OC(34)S")
    # a CDMS line: H2CO 2(1,2)-1(1,1) at 140839.5 MHz, E_up 21.9 K
    h2co = lte.load_molecule("H2CO", catalog=db)
    i = np.argmin(np.abs(h2co.freq_MHz - 140839.5))
    assert abs(h2co.E_up_K[i] - 21.9) < 0.2 and h2co.g_u[i] == 15


def test_splatalogue_known_jpl_line(shared_data):
    """CH3CN 12(0)-11(0) at 220747.26 MHz: A = 9.2e-4 s^-1, E_up = 68.9 K (JPL 41001)."""
    mol = lte.load_molecule("CH3CN", catalog=shared_data / SPLAT)
    i = np.argmin(np.abs(mol.freq_MHz - 220747.26))
    assert abs(mol.freq_MHz[i] - 220747.26) < 0.1 and abs(mol.A_s[i] / 9.2e-4 - 1) < 0.03
    assert abs(mol.E_up_K[i] - 68.9) < 0.1
    assert "tag 041001" in mol.source and "CH3CN v8=1" in mol.source  # one JPL entry, two states


def test_splatalogue_isotopomers_pair_by_position(shared_data):
    db = shared_data / SPLAT  # same atoms, different 13C position: told apart by atom order
    tags = {
        n: lte.load_molecule(n, catalog=db).source for n in ("H(13)CCCN", "HC(13)CCN", "HCC(13)CN")
    }
    assert "tag 052509 HC-13-CCN" in tags["H(13)CCCN"]
    assert "tag 052510 HCC-13-CN" in tags["HC(13)CCN"]
    assert "tag 052511 HCCC-13-N" in tags["HCC(13)CN"]


def test_splatalogue_refusals(shared_data):
    db = shared_data / SPLAT
    with pytest.raises(ValueError, match="no CDMS partition function of mass 43"):
        catalogs.read_splatalogue(db, "HNCO v=0", tables={})
    with pytest.raises(ValueError, match="no partition function"):
        lte.load_molecule("CH3OH", catalog=db)  # SLAIM rows only
    with pytest.raises(ValueError, match="unknown molecule 'CH3OHX'.*closest"):
        lte.load_molecule("CH3OHX", catalog=db)
