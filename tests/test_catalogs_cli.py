"""The command line of catalogs.py (`fetch`, `info`): options, bad input, help."""

import dataclasses
import gzip

import pytest

import catalogs


def _run(argv: list[str], capsys) -> tuple:
    """(exit code, stdout, stderr) of catalogs.main(argv): argparse's errors exit, the others
    return 2."""
    try:
        code = catalogs.main(argv)
    except SystemExit as err:
        code = err.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_prints_the_lines_in_the_range(capsys):
    data = str(catalogs.DATA_DIR)
    code, out, _ = _run(["info", "CH3OH", "--freq", "241000:242000", "--catalog", data], capsys)
    mol = catalogs.load_molecule("CH3OH", data, (241000.0, 242000.0))
    assert code == 0 and f"name=CH3OH lines={mol.freq_MHz.size} " in out
    assert mol.freq_MHz.size < catalogs.load_molecule("CH3OH").freq_MHz.size


def test_fetch_writes_the_entry_into_the_cache(tmp_path, capsys):
    server = tmp_path / "server"  # a file:// URL stands in for CDMS
    server.mkdir()
    with gzip.open(catalogs.DATA_DIR / "c044505.cat.gz", "rb") as src:
        (server / "c044505.cat").write_bytes(src.read())
    cache = tmp_path / "cache"
    argv = ["fetch", "44505", "--cache", str(cache), "--cdms_url", server.as_uri() + "/"]
    code, out, _ = _run(argv, capsys)
    assert code == 0 and out.strip() == f"fetched={cache / 'c044505.cat'}"
    assert (cache / "index.json").exists() and (cache / "q_044505.txt").exists()


def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys):
    offline = ["--cache", str(tmp_path / "cache"), "--cdms_url", "http://127.0.0.1:9/"]
    cases = {
        ("bogus", "CH3OH"): "invalid choice: 'bogus'",
        ("info",): "required: name",
        ("fetch", "CH3OH", "--catalog", "data"): "--catalog: only for info, not fetch",
        ("info", "CH3OH", "--cache", str(tmp_path)): "--cache: only for fetch, not info",
        ("info", "CH3OH", "--freq", "1:2:3"): "--freq 1:2:3: expected LO:HI in MHz",
        ("info", "CH3OH", "--freq", "a:b"): "--freq a:b: expected LO:HI in MHz",
        ("info", "CH3OH", "--freq", "2:1"): "expected lo < hi",
        ("info", "NOPE_MOLECULE"): "unknown molecule 'NOPE_MOLECULE'",
        ("info", "CH3OH", "--catalog", str(tmp_path / "none")): "does not exist",
        ("fetch", "44505", *offline): "cannot download",
    }
    for argv, message in cases.items():
        code, out, err = _run(list(argv), capsys)
        errors = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and out == "" and len(errors) == 1 and message in errors[0], argv
    assert not (tmp_path / "cache").exists()  # the failed download wrote nothing


def test_help_lists_every_option_with_its_help(capsys):
    code, out, _ = _run(["--help"], capsys)
    text = " ".join(out.split())  # argparse wraps the help lines
    helps = {
        "command": "{fetch,info} fetch (a CDMS/JPL entry into the cache) or info (a molecule's",
        "name": "name fetch: a CDMS/JPL name or tag; info: a name, tag or catalogue file",
        "cache": '--cache CACHE fetch: cache folder ("" = $SPECTUNER_CACHE or',
        "cdms_url": f"--cdms_url CDMS_URL fetch: the CDMS entries (default: {catalogs.CDMS_URL})",
        "jpl_url": f"--jpl_url JPL_URL fetch: the JPL entries and catdir.cat (default: "
        f"{catalogs.JPL_URL})",
        "catalog": "--catalog CATALOG info: where the name resolves (a .cat file, a folder of "
        'them, an XCLASS or Splatalogue sqlite file; "" = the bundled data/ folder, then the '
        "cache of fetch) (default: '')",
        "freq": '--freq FREQ info: LO:HI rest-frequency range [MHz] ("" = every line)',
    }
    assert code == 0 and set(helps) == {f.name for f in dataclasses.fields(catalogs.Config)}
    for name, help_text in helps.items():
        assert help_text in text, name
    assert "python catalogs.py info CH3OH --freq 232000:233000" in text  # the docstring's example


@pytest.mark.parametrize("argv", [["fetch", "CH3OH"], ["info", "CH3OH"]])
def test_defaults_of_the_other_command_are_accepted(argv):
    cfg = catalogs.parse_config(argv)
    assert cfg.command == argv[0] and cfg.name == "CH3OH" and cfg.catalog == cfg.cache == ""
