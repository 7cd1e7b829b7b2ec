"""Tests of the benchmarks: bench_quality.py's coverage benchmark (issue 14), the clean and
line-forest populations and the printed table; bench.py's command line (--kind, bad input, help)."""

import dataclasses
import inspect

import numpy as np
import pytest

import bench
import bench_quality
import forest
import lte
import spectuner

RUNS = ("pm", "pm+chi2", "chi2")


def _table(out: str) -> list[dict]:
    """The key=value lines of a bench run, as dicts of strings."""
    return [dict(f.split("=", 1) for f in line.split()) for line in out.splitlines() if line]


def _check_table(rows: list[dict], kind: str, n_cases: int) -> dict:
    """Structure of bench_coverage's output; returns {(run, param or None): row}."""
    by_key = {(r["run"], r.get("param")): r for r in rows}
    assert len(rows) == len(by_key) == len(RUNS) * (len(spectuner.PARAM_NAMES) + 1)
    for (run, param), r in by_key.items():
        assert r["kind"] == kind and run in RUNS and int(r["cases"]) == n_cases
        if param is None:  # the flag counts of the run
            counts = [int(r[k]) for k in ("polish_skipped", "at_bound", "nearly_thin", "dropped")]
            assert all(0 <= c <= n_cases for c in counts)
            assert max(counts[:3]) <= int(r["flagged"]) <= sum(counts[:3])
            assert 0.0 <= float(r["median_dropped_frac"]) <= 1.0
            continue
        assert 0 <= int(r["finite"]) <= n_cases
        w1, w3 = float(r["within_1sigma"]), float(r["within_3sigma"])
        assert 0.0 <= w1 <= w3 <= 1.0 or int(r["finite"]) == 0
        assert float(r["median_abs_error"]) >= 0.0
    return by_key


def test_forest_cases_are_ch3oh_in_a_forest_with_the_injected_truth(shared_data):
    windows, mol, truth, extra = next(bench_quality.coverage_cases("forest", 1, 13))
    mols = forest.load_forest_molecules(shared_data / "catalogs", quiet=True)
    wins, drawn = forest.draw_forest([13, 0], mols, "CH3OH", "hot_corino", 6, 1)
    assert mol.name == "CH3OH" and len(drawn["params"]) >= 20  # among 20-60 molecules
    np.testing.assert_array_equal(truth, drawn["params"]["CH3OH"])
    np.testing.assert_array_equal(windows[0].T_obs_K, wins[0].T_obs_K)
    # the truth lies inside the box the forest mode fits in (not in the default one: N > 1e20)
    box = spectuner.make_box(["CH3OH"], extra["bounds"])
    u = spectuner.to_unit(truth[None], box)[0]
    assert np.all((u > 0) & (u < 1)) and truth[2] > 1e20
    # other molecules' lines: what is left after the target and the noise is emission
    w = windows[0]
    other = w.T_obs_K - lte.spectrum(w.freq_MHz, mol, truth[None], w.T_bg_K)[0]
    assert np.max(other - drawn["noise_K"][0]) > 5 * w.rms_K


def test_coverage_forest_mode_prints_the_table_and_flags(shared_data, capsys):
    bench_quality.bench_coverage(n_cases=3, seed=13, kind="forest")
    table = _check_table(_table(capsys.readouterr().out), "forest", 3)
    refined = table["pm+chi2", None]
    assert int(refined["dropped"]) >= 1  # forests have blends the refinement leaves out
    # seed 13: the refined pm fits find the target's lines (v_off and FWHM close to the truth)
    assert float(table["pm+chi2", "v_off"]["median_abs_error"]) < 0.1  # km/s
    assert float(table["pm+chi2", "delta_v"]["median_abs_error"]) < 0.2  # relative
    # while chi2 on every channel is pulled away by the blends (3 km/s here): a forest, not clean
    assert float(table["chi2", "v_off"]["median_abs_error"]) > 1.0


def test_coverage_clean_mode_prints_the_table(capsys):
    bench_quality.bench_coverage(n_cases=2, seed=13)
    table = _check_table(_table(capsys.readouterr().out), "clean", 2)
    assert int(table["pm+chi2", None]["polish_skipped"]) == 0  # no forest, nothing unexplained
    assert float(table["chi2", "v_off"]["median_abs_error"]) < 0.1  # S/N >= 20: km/s


def test_coverage_kind_is_checked():
    with pytest.raises(ValueError, match="coverage kind 'dense'"):
        next(bench_quality.coverage_cases("dense", 1, 0))
    for argv in (["coverage", "--kind", "dense"], ["lte", "--kind", "forest"]):
        with pytest.raises(SystemExit) as err:
            bench.main(argv)
        assert err.value.code == 2


def test_cli_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys):
    cases = {("nope",): "invalid choice: 'nope'", (): "required: which",
             ("lte", "--ref_python", str(tmp_path / "py")): "no such file",
             ("fit", "--kind", "forest"): "--kind forest: only for coverage, not fit",
             ("coverage", "--n_cases", "3"): "unrecognized arguments"}  # fmt: skip
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as err:
            bench.main(list(argv))
        lines = capsys.readouterr().err.splitlines()
        errors = [line for line in lines if "error:" in line]
        assert err.value.code == 2 and len(errors) == 1 and message in errors[0], argv


def test_cli_help_lists_every_benchmark_and_option(capsys):
    with pytest.raises(SystemExit) as err:
        bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    assert err.value.code == 0
    names = ["coverage", "cube", "fit", "forest", "limits", "lte", "problem", "recover"]
    assert sorted(bench.BENCHES) == names and "{" + ",".join(names) + "}" in text
    assert all(f"python bench.py {name}" in text for name in names)  # the docstring's commands
    helps = {"which": "the benchmark: lte, problem, fit, recover, cube, forest, limits, coverage",
             "ref_python": "--ref_python REF_PYTHON lte, cube: a Python with the reference "
             "Spectuner 2.0.0 (\"\" = none) (default: '')",
             "kind": "--kind {clean,forest} coverage: clean (CH3OH alone) or forest (in "
             "hot_corino line forests) (default: clean)"}  # fmt: skip
    assert set(helps) == {f.name for f in dataclasses.fields(bench.Config)}
    for name, help_text in helps.items():
        assert help_text in text, name


def test_cli_passes_each_benchmark_the_options_it_takes(monkeypatch, tmp_path):
    python = tmp_path / "python"
    python.write_text("")  # --ref_python must name a file
    calls = {}
    for name, fn in list(bench.BENCHES.items()):

        def stand_in(fn=fn, name=name, **kw):
            inspect.signature(fn).bind(**kw)  # the real benchmark takes these keywords
            calls[name] = kw

        monkeypatch.setitem(bench.BENCHES, name, stand_in)
    for name in bench.BENCHES:
        bench.main([name, "--ref_python", str(python)])
    expected = {name: {} for name in bench.BENCHES}
    expected |= {"lte": {"ref_python": str(python)}, "cube": {"ref_python": str(python)},
                 "coverage": {"kind": "clean"}}  # fmt: skip
    assert calls == expected
    bench.main(["coverage", "--kind", "forest"])
    assert calls["coverage"] == {"kind": "forest"}
