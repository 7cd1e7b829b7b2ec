"""Tests of evaluate.py: relative losses, merging of runs, and a tiny end-to-end comparison."""

import csv

import numpy as np
import pytest

import evaluate


def test_relative_loss_uses_the_best_run_of_each_case():
    rows = [
        dict(group="g", case=0, method="a", loss=-10.0),
        dict(group="g", case=0, method="b", loss=-8.0),
        dict(group="g", case=1, method="a", loss=2.0),
        dict(group="g", case=1, method="b", loss=1.0),
        dict(group="g", case=1, method="c", error="no policy"),
    ]
    evaluate.relative(rows)
    assert [r.get("rel_loss") for r in rows] == [0.0, 0.2, 1.0, 0.0, None]


def test_tiny_comparison_end_to_end(tmp_path):
    out = tmp_path / "a"
    cfg = evaluate.Config(out=str(out), n_spectra=2, groups=["trained"], trained=["CH3OH"],
                          methods=["random+slsqp"], ref_restarts=0, n_init=10, seed=3)  # fmt: skip
    summary = evaluate.main(cfg)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and all(float(r["nfev"]) > 10 for r in rows)
    assert all(np.isfinite(float(r["err_v_off"])) for r in rows)  # true parameters known
    assert summary[0]["rel_loss_mean"] == 0.0  # the only method is its own reference
    assert (out / "summary.csv").exists()
    # a second method on the same spectra, merged: the reference is the better of the two
    out_b = tmp_path / "b"
    evaluate.main(
        evaluate.Config(**{**cfg.__dict__, "out": str(out_b), "methods": ["random+nelder-mead"]})
    )
    inputs = [f"{out}/results.csv", f"{out_b}/results.csv"]
    merged = evaluate.main(evaluate.Config(out=str(tmp_path / "m"), inputs=inputs))
    assert {s["method"] for s in merged} == {"random+slsqp", "random+nelder-mead"}
    assert min(s["rel_loss_median"] for s in merged) == 0.0
    assert all(s["rel_loss_mean"] >= 0.0 for s in merged)


def test_synthetic_cases_are_reproducible():
    cfg = evaluate.Config()
    mol = evaluate.load("CH3OH", cfg)
    a = evaluate.synthetic_case(mol, [], np.random.default_rng(5), cfg)
    b = evaluate.synthetic_case(mol, [], np.random.default_rng(5), cfg)
    assert np.array_equal(a["windows"][0].T_obs_K, b["windows"][0].T_obs_K)
    assert a["windows"][0].T_obs_K.max() > 3 * a["windows"][0].rms_K  # lines above the noise


def test_real_cases_skip_without_data(tmp_path):
    assert evaluate.real_cases(evaluate.Config(real_dir=str(tmp_path / "absent"))) == []


def test_unknown_group_is_an_error(tmp_path):
    cfg = evaluate.Config(out=str(tmp_path), groups=["trained", "nope"], trained=["CH3OH"])
    with pytest.raises(ValueError, match="nope"):
        evaluate.fit_all(cfg)


def test_forest_groups_have_trained_and_held_out_targets(shared_data):
    cfg = evaluate.Config(n_spectra=3, catalog=str(shared_data / "catalogs"))
    trained = evaluate.forest_cases("forest_trained", cfg, np.random.default_rng(0))
    held = evaluate.forest_cases("forest_heldout", cfg, np.random.default_rng(0))
    names = cfg.heldout
    assert all(c["mol"].name not in names for c in trained)
    assert all(c["mol"].name in names for c in held)
    for case in trained + held:  # the truth is the target's, and its lines are in the window
        (w,) = case["windows"]
        assert case["truth"].shape == (5,) and w.T_obs_K.max() > 5 * np.max(w.rms_K)


def test_command_line_lists_and_errors(tmp_path, capsys):
    cfg = evaluate.parse_config(["--groups", "trained", "real", "--nn_n_init", "5", "7",
                                 "--snr_range", "3", "30", "--real_spw", "all"])  # fmt: skip
    assert cfg.groups == ["trained", "real"] and cfg.nn_n_init == [5, 7]
    assert cfg.snr_range == [3.0, 30.0] and cfg.real_spw == ["all"]
    with pytest.raises(SystemExit) as stop:  # argparse rejects a word where a number goes
        evaluate.parse_config(["--nn_n_init", "x"])
    assert stop.value.code == 2
    help_text = evaluate.config_parser(evaluate.Config).format_help()
    assert "forest_heldout" in help_text  # the continuation comment line is part of the help
    with pytest.raises(FileNotFoundError, match="no such folder"):
        evaluate.load("SO2", evaluate.Config(catalog=str(tmp_path / "none")))
