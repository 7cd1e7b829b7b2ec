"""Tests of train.py: smoke, resume, replay buffer, baseline, learning and the shipped weights."""

import csv
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import lte
import model
import replay
import rl
import spectuner
import state_server
import states
import train

POLICY = Path(__file__).resolve().parents[1] / "data" / "policy.pt"


def _tiny(tmp_path, **kw) -> train.Config:
    """A seconds-long configuration: bundled CH3OH only, tiny network, short windows."""
    base = dict(
        run_dir=str(tmp_path / "run"), molecules=["CH3OH"], holdout=[], catalog="", real_dir="",
        n_steps=3, batch_states=4, k_samples=4, pool_size=4, d_model=16, n_layers=1,
        max_tokens=8, hidden=16, fine_len=16, max_chan=400, max_windows=2, n_eval=2, eval_every=3,
        log_every=1, quiet=True,
    )  # fmt: skip
    return train.Config(**(base | kw))


def _rows(run_dir) -> list:
    with open(Path(run_dir) / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_smoke_writes_checkpoint_metrics_config(tmp_path):
    cfg = _tiny(tmp_path)
    last = train.main(cfg)
    run = Path(cfg.run_dir)
    assert last["step"] == 3 and np.isfinite(last["reward"])
    assert {"ckpt.pt", "metrics.csv", "config.json", "best.pt"} <= {p.name for p in run.iterdir()}
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["buffer"]["ids"]) > 0
    assert [int(r["step"]) for r in _rows(run)] == [1, 2, 3]
    net, _ = model.load_policy(run / "best.pt")  # the exported format loads
    out = tmp_path / "policy.pt"
    train.main(train.Config(command="export", paths=[str(run / "ckpt.pt"), str(out)]))
    model.load_policy(out)


def test_snapshots_every_n_steps_are_policies_of_those_steps(tmp_path):
    """--snap_every writes run_dir/snaps/step_N.pt at every N-th step (for choosing the shipped
    policy by evaluate.py), each the network at that step, loadable as a policy file."""
    cfg = _tiny(tmp_path, n_steps=4, snap_every=2)
    train.main(cfg)
    snaps = sorted(p.name for p in (Path(cfg.run_dir) / "snaps").iterdir())
    assert snaps == ["step_0000002.pt", "step_0000004.pt"]
    last, _ = model.load_policy(Path(cfg.run_dir) / "snaps" / "step_0000004.pt")
    first, _ = model.load_policy(Path(cfg.run_dir) / "snaps" / "step_0000002.pt")
    ckpt = torch.load(Path(cfg.run_dir) / "ckpt.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, ckpt[k]) for k, v in last.state_dict().items())
    assert any(not torch.equal(v, ckpt[k]) for k, v in first.state_dict().items())
    other = _tiny(tmp_path / "b", n_steps=4, snap_every=2, log_every=3)  # not a multiple
    train.main(other)
    assert sorted(p.name for p in (Path(other.run_dir) / "snaps").iterdir()) == snaps


def test_resume_continues_from_saved_step(tmp_path):
    train.main(_tiny(tmp_path, n_steps=3))
    last = train.main(_tiny(tmp_path, n_steps=5, resume=True))
    assert last["step"] == 5
    assert [int(r["step"]) for r in _rows(tmp_path / "run")] == [1, 2, 3, 4, 5]
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 5


def test_resume_takes_the_learning_rate_of_the_command_line(tmp_path):
    """--lr on --resume replaces the saved optimiser's rate (a lower rate for a plateau)."""
    train.main(_tiny(tmp_path, n_steps=2))
    train.main(_tiny(tmp_path, n_steps=3, resume=True, lr=1e-5))
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert [g["lr"] for g in ck["optimizer"]["param_groups"]] == [1e-5]


def test_a_stop_request_checkpoints_at_the_step_boundary(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "STOP", threading.Event())
    train.STOP.set()  # as SIGTERM or Ctrl-C does on the command line
    train.main(_tiny(tmp_path, n_steps=5))
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 1  # one step finished, saved, stopped
    train.STOP.clear()
    assert train.main(_tiny(tmp_path, n_steps=3, resume=True))["step"] == 3


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="loss"):
        train.main(_tiny(tmp_path, loss="l2"))
    with pytest.raises(ValueError, match="shaping"):
        train.main(_tiny(tmp_path, shaping="top"))
    with pytest.raises(ValueError, match="export needs"):
        train.main(train.Config(command="export", paths=["only_one"]))
    with pytest.raises(ValueError, match="trained and held out"):
        train.main(_tiny(tmp_path, holdout=["CH3OH"]))
    with pytest.raises(ValueError, match="could be loaded"):
        train.main(_tiny(tmp_path, molecules=["NoSuchMolecule"]))
    with pytest.raises(ValueError, match="--catalog .*no such folder"):
        train.main(_tiny(tmp_path, catalog=str(tmp_path / "absent")))
    with pytest.raises(ValueError, match="--real_dir .*no such folder"):
        train.main(_tiny(tmp_path, real_dir=str(tmp_path / "absent")))


def test_buffer_priorities_probabilities_weights():
    buf = replay.ReplayBuffer(capacity=4, alpha=0.5, eps=1e-3)
    buf.add(10, np.zeros(5), 1.0)
    assert buf.priority[0] == 1.0  # the initial maximum
    buf.update(np.array([0]), np.array([4.0 - 1e-3]), np.zeros((1, 5)), np.array([0.5]))
    assert buf.priority[0] == pytest.approx(4.0)  # lag + eps
    buf.add(11, np.ones(5), 2.0)
    assert buf.priority[1] == pytest.approx(4.0)  # new states enter at the maximum priority seen
    buf.update(np.array([1]), np.array([1.0 - 1e-3]), np.ones((1, 5)), np.array([2.0]))
    np.testing.assert_allclose(buf.probs(), np.array([2.0, 1.0]) / 3.0)  # p^alpha, alpha = 1/2
    rng = np.random.default_rng(0)
    draws = np.concatenate([buf.sample(1, 0.4, rng)[0] for _ in range(3000)])
    assert abs(np.mean(draws == 0) - 2 / 3) < 0.03
    idx, w = buf.sample(2, 1.0, rng)
    P = buf.probs()[idx]
    np.testing.assert_allclose(w, (2 * P) ** -1.0 / (2 * (1 / 3)) ** -1.0)
    assert w.max() == pytest.approx(1.0)  # the least likely slot has the largest weight
    for _ in range(5):  # FIFO: the oldest slot is replaced when full
        buf.add(20, np.zeros(5), 0.0)
    assert len(buf) == 4 and buf.ids[0] == 20
    buf.update(np.array([1]), np.array([1e6]), np.ones((1, 5)), np.array([2.0]))
    assert buf.priority[1] == pytest.approx(10.0 + 1e-3)  # the lag cap, then eps


def test_beta_anneals_to_one(tmp_path):
    last = train.main(_tiny(tmp_path, n_steps=4, beta0=0.4, beta_steps=2, eval_every=0))
    betas = [float(r["beta"]) for r in _rows(tmp_path / "run")]
    assert betas[0] == pytest.approx(0.4) and betas[-1] == 1.0 and last["step"] == 4


def test_leave_one_out_baseline():
    r = np.array([1.0, 2.0, 3.0])
    z = (r - 2.0) / np.sqrt(2.0 / 3.0)
    expected = np.array([z[0] - (z[1] + z[2]) / 2, z[1] - (z[0] + z[2]) / 2, z[2] - z[:2].mean()])
    np.testing.assert_allclose(rl.loo_advantage(r), expected)
    np.testing.assert_allclose(rl.loo_advantage(np.ones(4)), 0.0)


def test_rank_utility_ties_and_order():
    u = rl.rank_utility(np.array([-100.0, -1.0, -1.02, -2.0]), resolution=0.1)
    assert u[0] == 0.0 and u[1] == u[2] > u[3]  # -1.0 and -1.02 tie at resolution 0.1
    assert u[3] == 0.0  # rank 3 of 4: max(0, log(4/2 + 1) - log(3)) = 0
    assert rl.rank_utility(np.array([1.0, 2.0]), 0.0)[1] == pytest.approx(np.log(2.0))


def test_short_training_improves_reward_on_a_fixed_state(tmp_path):
    """One fixed synthetic CH3OH state, 60 steps: the best of K rewards rises (inference keeps the
    best of N_init, and rank shaping optimises for it; the mean may fall meanwhile)."""
    cfg = _tiny(tmp_path, n_steps=60, fixed_states=1, per=False, p_absent=0.0, max_others=0,
                k_samples=16, lr=3e-3, eval_every=0, loss="chi2", max_windows=1)  # fmt: skip
    train.main(cfg)
    best = np.array([float(r["best_loss"]) for r in _rows(cfg.run_dir)])
    assert best[-10:].mean() < 0.5 * best[:10].mean()


def test_real_windows_as_states(tmp_path, shared_data):
    cfg = _tiny(tmp_path, real_dir=str(shared_data / "spectra" / "iras16293b"), real_frac=1.0,
                n_steps=2, eval_every=0)  # fmt: skip
    ctx = dict(train={"CH3OH": lte.load_molecule("CH3OH")}, hold={},
               real=states.load_real(cfg.real_dir, cfg.v_lsr), box=spectuner.make_box(["t"]),
               mcfg=model.ModelConfig(max_tokens=8))  # fmt: skip
    state = states.make_state(0, 0, ctx, cfg)
    assert state["real"] and state["n_peaks"] > 10 and state["tokens"]["spec"].shape[0] == 8
    assert train.main(cfg)["step"] == 2


def test_shipped_policy_beats_uniform_draws():
    """A fixed synthetic CH3OH spectrum (241.6-241.95 GHz, 3000 channels, rms 0.1 K): the best of
    50 policy samples beats the best of 50 uniform draws, as the median of 5 seeded repeats (one
    draw of 50 either way is itself a lottery)."""
    if not POLICY.exists():
        pytest.skip(f"{POLICY} is absent (made by train.py export)")
    assert {"config", "state_dict"} <= set(torch.load(POLICY, weights_only=True))  # no pickle
    net, mcfg = model.load_policy(POLICY)
    mol = lte.load_molecule("CH3OH")
    rng = np.random.default_rng(0)
    f = np.linspace(241_600.0, 241_950.0, 3000)
    T = lte.spectrum(f, mol, np.array([[0.5, 150.0, 3e16, 3.0, 2.0]]))[0]
    T = T + rng.normal(0, 0.1, f.size)
    win = spectuner.Window(f, T, 0.1, 0.0, 1.0)
    box = spectuner.make_box(["CH3OH"])
    fit = spectuner.Problem([win], [mol], box, "pm")
    batch = model.collate([model.make_tokens([win], spectuner.line_table(mol, mcfg), mcfg)])
    best_policy, best_uniform = [], []
    for r in range(5):
        with torch.no_grad():
            u = net.sample(batch, 50, generator=torch.Generator().manual_seed(r))[0][:, 0]
        best_policy.append(fit(u.double().numpy()).min())
        U = np.random.default_rng(100 + r).random((50, 5))
        best_uniform.append(fit(U).min())
    assert np.median(best_policy) < np.median(best_uniform)


def test_forest_states_keep_held_out_molecules_apart(shared_data):
    forest = pytest.importorskip("forest")
    cfg = train.Config(holdout=list(train.HOLDOUT), catalog=str(shared_data / "catalogs"))
    every = forest.load_forest_molecules(cfg.catalog, quiet=True)
    ctx = dict(
        forest_all=every,
        box=spectuner.make_box(["t"]),
        mcfg=model.ModelConfig(),
        forest={n: m for n, m in every.items() if not forest.is_excluded(n, cfg.holdout)},
    )
    for sid in range(12):
        state = states.forest_state(sid, 0, np.random.default_rng(sid), ctx, cfg)
        assert not forest.is_excluded(state["name"], cfg.holdout)
        assert state["problem"].n_chan >= 1000 and state["n_peaks"] > 0
        assert len(state["forest"]) >= 10 and state["name"] in state["forest"]
        assert not any(forest.is_excluded(n, cfg.holdout) for n in state["forest"])
        held = states.forest_state(sid, 2, np.random.default_rng(sid), ctx, cfg)
        assert forest.is_excluded(held["name"], cfg.holdout)


def _toy_policy(seed=0):
    """A tiny policy and the tokens of one fixed state (one line, one window)."""
    torch.manual_seed(seed)
    mcfg = model.ModelConfig(d_model=16, n_heads=2, n_layers=1, ff_hidden=16, patch_channels=4,
                             max_tokens=4, hidden_features=(16,), bins=8, fine_len=0)  # fmt: skip
    f = np.linspace(99_990.0, 100_010.0, 200)
    one = dict(freq_MHz=1e5, A_s=1e-5, g_u=3.0, E_low_K=10.0, E_up_K=14.8)
    lines = {k: np.array([v]) for k, v in one.items()} | {"log10_Q": np.zeros(8)}
    batch = model.collate([model.make_tokens([(f, np.zeros(f.size), 0.1)], lines, mcfg)])
    return model.PolicyNet(mcfg), batch


def test_reinforce_gradient_moves_towards_the_better_action():
    net, batch = _toy_policy()
    u = torch.tensor([[[0.2] * 5], [[0.8] * 5], [[0.5] * 5]])  # (K+1=3, B=1, 5), member 2 absent
    adv = torch.tensor(rl.loo_advantage(np.array([1.0, -1.0])).tolist() + [0.0])[:, None]
    before = net.log_prob(u, batch).detach()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(5):
        pg, ent = rl.reinforce_loss(net.log_prob(u, batch), adv, torch.ones(1) / 2, 0.0, 2, 0.0)
        opt.zero_grad()
        pg.backward()
        opt.step()
    after = net.log_prob(u, batch).detach()
    assert after[0, 0] > before[0, 0] + 0.05 and after[1, 0] < before[1, 0] - 0.05


def test_mixture_weights_and_entropy_gradient():
    logp = torch.tensor([[0.0], [math.log(3.0)], [0.0]], requires_grad=True)
    adv = torch.tensor([[1.0], [1.0], [0.0]])
    pg, _ = rl.reinforce_loss(logp, adv, torch.ones(1), 0.5, 1, 0.0)
    # rho = pi / (0.5 pi + 0.5): 1 at pi = 1, 3 / 2 at pi = 3; pg = -(rho_0 logp_0 + rho_1 logp_1)
    assert pg.item() == pytest.approx(-(1.5 * math.log(3.0)))
    _, ent = rl.reinforce_loss(logp, adv, torch.ones(1), 0.0, 2, 1.0)
    ent.backward()  # d/dlogp of mean((lp - mean) lp) = (lp - mean) / n: lowers the likely one
    g = logp.grad[:2, 0]
    assert g[1] > 0 > g[0]


def _toy_run(loss_fn, explore_frac, steps=80, K=16, imit_coef=0.0):
    """Train the toy policy on loss_fn (K, 5) -> (K,); return (trained net, batch, generator).
    With imit_coef > 0 the state keeps 4 distinct elites (as the replay buffer does) and the
    step adds their imitation_loss."""
    net, batch = _toy_policy()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    n_uni = int(round(explore_frac * K))
    elite_u, elite_l = np.zeros((0, 5)), np.zeros(0)
    for _ in range(steps):
        u = rl.draw_actions(net, batch, K, n_uni, gen)[:, 0]  # (K, 5)
        loss = loss_fn(u)
        elite_u, elite_l = replay.distinct_elites(np.concatenate([elite_u, u]),
                                                 np.concatenate([elite_l, loss]), 1.0, 4, 0.3,
                                                 0.1)  # fmt: skip
        adv = rl.loo_advantage(rl.rank_utility(-loss, 0.0))
        u_all = torch.tensor(np.concatenate([u, u[:1], elite_u])[:, None], dtype=torch.float32)
        A = torch.tensor(np.append(adv, 0.0)[:, None], dtype=torch.float32)
        logp = net.log_prob(u_all, batch)
        pg, ent = rl.reinforce_loss(logp[: K + 1], A, torch.ones(1) / K, n_uni / K,
                                       K - n_uni, 0.03)  # fmt: skip
        present = torch.tensor(np.isfinite(elite_l)[:, None], dtype=torch.float32)
        imit = rl.imitation_loss(logp[K + 1 :], present, torch.ones(1), imit_coef)
        opt.zero_grad()
        (pg + ent + imit).backward()
        opt.step()
    return net, batch, gen


def test_elite_imitation_keeps_two_equal_basins():
    """Two equally good basins, u_0 = 0.25 or 0.75. The policy gradient alone (mode seeking)
    puts nearly all samples into one of them within 300 steps; imitating the state's distinct
    elites (imitation_loss, forward KL: mode covering) keeps a share in each (measured on toy
    seeds 0-2 up to 800 steps: 0.19-0.71 in the right basin, against 0.01 or 0.98 without)."""
    two = lambda u: (np.minimum(np.abs(u[:, 0] - 0.25), np.abs(u[:, 0] - 0.75))  # noqa: E731
                     + 0.2 * np.abs(u[:, 1:] - 0.5).mean(1))  # fmt: skip
    shares = []
    for coef in (0.0, 1.0):
        net, batch, gen = _toy_run(two, 0.25, steps=300, imit_coef=coef)
        with torch.no_grad():
            own = net.sample(batch, 400, generator=gen)[0].double().numpy()[:, 0]
        shares.append(float(np.mean(own[:, 0] > 0.5)))
    assert min(shares[0], 1 - shares[0]) < 0.05, shares  # collapsed onto one basin
    assert 0.15 < shares[1] < 0.85, shares  # both basins kept


def test_distinct_elites_and_the_buffer_keep_them():
    U = np.array([[0.1] * 5, [0.12] * 5, [0.9] * 5, [0.5] * 5, [0.3] * 5])
    L = np.array([-10.0, -10.0, -9.8, 5.0, np.nan])
    eu, el = replay.distinct_elites(U, L, scale=1.0, m=3, dist=0.1, tol=0.05)
    # the second is too close to the first, the fourth lags by 15 / 11, the fifth is not finite
    assert np.allclose(el[:2], [-10.0, -9.8]) and np.isinf(el[2]) and np.allclose(eu[1], 0.9)
    buf = replay.ReplayBuffer(capacity=2, alpha=0.6, eps=1e-3, n_elites=3)
    buf.add(7, eu[0], el[0], (eu, el))
    old = {k: v for k, v in buf.state_dict().items() if not k.startswith("elite")}
    again = replay.ReplayBuffer(capacity=2, alpha=0.6, eps=1e-3, n_elites=3)
    again.load_state_dict(old)  # a checkpoint from before elites: its best is the first elite
    assert again.elite_loss[0, 0] == -10.0 and np.isinf(again.elite_loss[0, 1])
    again.load_state_dict(buf.state_dict())
    assert np.array_equal(again.elite_loss[0], el)


def test_uniform_share_escapes_a_collapsed_policy():
    """A policy trained on one basin (u_0 = 0.25) collapses there, and spread() says so. On a
    new loss whose better basin is u_0 > 0.5, its own samples never get there, while the best
    of K samples with a uniform share does: that best is what enters the replay buffer.
    (Measured: the toy policy's own distribution also collapses onto one of two equally good
    basins within 80 steps, with or without the uniform share; issue 12 is open on that.)"""
    net, batch, gen = _toy_run(lambda u: np.abs(u[:, 0] - 0.25), 0.0, steps=60)
    with torch.no_grad():
        own = net.sample(batch, 400, generator=gen)[0].double().numpy()  # (400, 1, 5)
    assert rl.spread(own)["eval_std_eta"] < 0.05 and np.mean(own[:, 0, 0] < 0.5) > 0.98
    better = lambda u: np.minimum(np.abs(u[:, 0] - 0.25) + 0.2, np.abs(u[:, 0] - 0.75))  # noqa
    hits = []  # of five steps' draws of K = 16, how many have their best in the better basin
    for n_uni in (0, 4):
        u = [rl.draw_actions(net, batch, 16, n_uni, gen)[:, 0] for _ in range(5)]
        hits.append(sum(int(x[np.argmin(better(x)), 0] > 0.5) for x in u))
    assert hits[0] <= 1 and hits[1] >= 4, hits


def test_init_starts_a_run_from_an_exported_policy(tmp_path):
    a = _tiny(tmp_path / "a", n_steps=2, eval_every=0)
    train.main(a)
    train.export(str(Path(a.run_dir) / "ckpt.pt"), str(tmp_path / "a.pt"))
    b = _tiny(tmp_path / "b", n_steps=1, eval_every=0, lr=0.0, init=str(tmp_path / "a.pt"))
    train.main(b)  # lr 0: the weights stay those it started from
    start = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    after = torch.load(Path(b.run_dir) / "ckpt.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(start[k], after[k]) for k in start)
    with pytest.raises(ValueError, match="differs"):
        train.main(_tiny(tmp_path / "c", d_model=8, init=str(tmp_path / "a.pt")))


def test_init_from_a_policy_without_the_fine_patch(tmp_path):
    """A policy made before the fine patch starts a run with it: every old weight carried over,
    the fine embedding at zero; resuming that run without the fine patch is refused."""
    a = _tiny(tmp_path / "a", n_steps=1, eval_every=0, fine_len=0)
    train.main(a)
    train.export(str(Path(a.run_dir) / "ckpt.pt"), str(tmp_path / "a.pt"))
    b = _tiny(tmp_path / "b", n_steps=1, eval_every=0, lr=0.0, init=str(tmp_path / "a.pt"))
    train.main(b)
    start = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    after = torch.load(Path(b.run_dir) / "ckpt.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(start[k], after[k]) for k in start)
    assert not after["encoder.embed_fine.weight"].any()
    with pytest.raises(ValueError, match="fine_len 160"):
        train.main(_tiny(tmp_path / "b", resume=True, fine_len=0, n_steps=2))


def test_real_states_carry_the_stored_global_answer(tmp_path, shared_data):
    """data/real_best.json (train.py real_best) matches the default training windows; its point
    joins every real state as its known answer, and it beats the best of 200 uniform draws on
    each of a few real states (it is in the narrow-line basin); a file for other windows is
    not used."""
    folder = str(shared_data / "spectra" / "iras16293b")
    cfg = train.Config(real_dir=folder)
    box = spectuner.make_box(["t"])
    u = states.load_real_best(cfg, box)
    assert u is not None and u.shape == (5,) and np.all((u >= 0) & (u <= 1))
    ctx = dict(train={"CH3OH": lte.load_molecule("CH3OH")}, hold={},
               real=states.load_real(folder, 2.7, train.REAL_HOLDOUT), box=box,
               mcfg=model.ModelConfig(max_tokens=8), real_u=u)  # fmt: skip
    tcfg = _tiny(Path(folder), real_frac=1.0)
    rng = np.random.default_rng(0)
    for sid in range(3):
        state = states.make_state(sid, 0, ctx, tcfg)
        assert state["real"] and np.array_equal(state["u_true"], u)
        assert state["problem"](u[None])[0] < state["problem"](rng.random((200, 5))).min()
    other = train.Config(real_dir=folder, real_holdout=["25"])
    assert states.load_real_best(other, box) is None


def test_held_out_real_windows_never_enter_training(shared_data):
    folder = str(shared_data / "spectra" / "iras16293b")
    every = states.load_real(folder, 2.7)
    kept = states.load_real(folder, 2.7, train.REAL_HOLDOUT)
    assert len(every) == 10 and len(kept) == 10 - len(train.REAL_HOLDOUT)
    cfg = train.Config()
    assert tuple(cfg.real_holdout) == train.REAL_HOLDOUT  # the default holds them out
    starts = {float(w.freq_MHz[0]) for w in kept}
    held = [w for w in every if float(w.freq_MHz[0]) not in starts]
    assert len(held) == len(train.REAL_HOLDOUT)
    ctx = dict(train={"CH3OH": lte.load_molecule("CH3OH")}, hold={}, real=kept,
               box=spectuner.make_box(["t"]), mcfg=model.ModelConfig(max_tokens=8))  # fmt: skip
    tcfg = _tiny(Path(folder), real_frac=1.0)
    for sid in range(20):  # every real state is made of training windows only
        state = states.make_state(sid, 0, ctx, tcfg)
        firsts = {float(w.freq_MHz[0]) for w in state["problem"].windows}
        assert state["real"] and firsts <= starts


def test_a_state_without_lines_in_reach_is_drawn_again(monkeypatch):
    calls = []

    def draw(sid, kind, ctx, cfg, attempt):
        calls.append(attempt)
        if attempt < 2:
            raise ValueError("molecule X has no line within 114 km/s of the windows")
        return dict(sid=sid, attempt=attempt)

    monkeypatch.setattr(states, "_draw_state", draw)
    assert states.make_state(5, 0, {}, train.Config())["attempt"] == 2 and calls == [0, 1, 2]
    monkeypatch.setattr(states, "_draw_state", lambda *a: (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(ValueError, match="bad"):  # other errors are not hidden
        states.make_state(5, 0, {}, train.Config())


def test_workers_give_the_same_run(tmp_path):
    """States made and scored in two worker processes give the run of one process, to the bit:
    the same metrics (but time) and the same weights; fixed_states makes one state id wait in
    the pool twice, which the server's references must survive."""
    runs = {}
    for w in (0, 2):
        cfg = _tiny(tmp_path / f"w{w}", n_steps=4, eval_every=2, workers=w, fixed_states=3)
        train.main(cfg)
        runs[w] = cfg
    a, b = _rows(runs[0].run_dir), _rows(runs[2].run_dir)
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in ("time_s", "it_s")} == {
            k: v for k, v in rb.items() if k not in ("time_s", "it_s")
        }
    wa = torch.load(Path(runs[0].run_dir) / "ckpt.pt", weights_only=True)["state_dict"]
    wb = torch.load(Path(runs[2].run_dir) / "ckpt.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ValueError, match="workers"):
        train.main(_tiny(tmp_path / "bad", workers=-1))


def test_state_server_references():
    """A state made twice is kept until dropped twice; losses come from its own problem."""
    cfg = _tiny(Path("."), workers=0)
    mcfg = model.ModelConfig(max_tokens=8, fine_len=16)
    ctx = dict(train={"CH3OH": lte.load_molecule("CH3OH")}, hold={}, real=[],
               box=spectuner.make_box(["t"]), mcfg=mcfg)  # fmt: skip
    server = state_server.StateServer(ctx, cfg)
    rec = server.make([7, 7, 8])
    assert "problem" not in rec[0] and rec[0]["sid"] == 7 and rec[2]["sid"] == 8
    U = np.random.default_rng(0).random((3, 5))
    direct = states.make_state(7, 0, ctx, cfg)["problem"](U)
    np.testing.assert_array_equal(server.losses([7], [U])[0], direct)
    server.drop([7])
    np.testing.assert_array_equal(server.losses([7], [U])[0], direct)  # one reference left
    server.drop([7, 8])
    assert not server.store
    with pytest.raises(KeyError):
        server.losses([7], [U])
