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
    cfg = evaluate.Config(out=str(out), n_spectra=2, groups="trained", trained="CH3OH",
                          methods="random+slsqp", ref_restarts=0, n_init=10, seed=3)  # fmt: skip
    summary = evaluate.main(cfg)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and all(float(r["nfev"]) > 10 for r in rows)
    assert all(np.isfinite(float(r["err_v_off"])) for r in rows)  # true parameters known
    assert summary[0]["rel_loss_mean"] == 0.0  # the only method is its own reference
    assert (out / "summary.csv").exists()
    # a second method on the same spectra, merged: the reference is the better of the two
    out_b = tmp_path / "b"
    evaluate.main(
        evaluate.Config(**{**cfg.__dict__, "out": str(out_b), "methods": "random+nelder-mead"})
    )
    inputs = f"{out}/results.csv,{out_b}/results.csv"
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


def test_real_cases_skip_without_data(monkeypatch, tmp_path):
    monkeypatch.setattr(evaluate, "SHARED", tmp_path)
    assert evaluate.real_cases(evaluate.Config()) == []


def test_unknown_group_is_an_error(tmp_path):
    cfg = evaluate.Config(out=str(tmp_path), groups="trained,nope", trained="CH3OH")
    with pytest.raises(ValueError, match="nope"):
        evaluate.fit_all(cfg)


def test_forest_groups_have_trained_and_held_out_targets(shared_data):
    cfg = evaluate.Config(n_spectra=3, catalog=str(shared_data / "catalogs"))
    trained = evaluate.forest_cases("forest_trained", cfg, np.random.default_rng(0))
    held = evaluate.forest_cases("forest_heldout", cfg, np.random.default_rng(0))
    names = cfg.heldout.split(",")
    assert all(c["mol"].name not in names for c in trained)
    assert all(c["mol"].name in names for c in held)
    for case in trained + held:  # the truth is the target's, and its lines are in the window
        (w,) = case["windows"]
        assert case["truth"].shape == (5,) and w.T_obs_K.max() > 5 * np.max(w.rms_K)
