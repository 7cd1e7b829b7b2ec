"""Train the Spectuner-D1 policy: one-step REINFORCE with a prioritized replay buffer (method §6).
"method §N" is a section of docs/method.md.

An episode is one step: a state s is (observed windows, target molecule), an action u ~ pi(.|s)
is a point of the unit cube of the five LTE parameters (method §3), the reward is -loss(u; s)
(method §4, peak matching by default). Per state K actions are drawn; the gradient is REINFORCE
with rewards standardised per state and a leave-one-out baseline (mean of the other K-1), plus an
optional entropy bonus.

States: synthetic spectra from lte.spectrum (target with parameters drawn over the box, absent in
a fraction of states; 1-3 windows placed on the target's strong lines; channel widths 0.1-2 km/s;
other molecules on top; Gaussian noise; varied T_bg and beams) and the real IRAS 16293-2422 B
windows with CH3OH as target. States wait in a pool grouped by the number of peaks above 4 rms and
are drawn group by group evenly (pixel binning, method §6). Every state is a function of its id
and cfg.seed, so the buffer and the checkpoint only keep ids.

Prioritized replay (our design, method §6): each used state enters the buffer with the best action
found so far and its loss, at maximum priority. A step mixes fresh states with replayed ones,
drawn with probability p_i^alpha / sum p^alpha and weighted by importance weights
(N P(i))^-beta / max, beta annealed to 1. A replayed state gets K fresh samples plus its stored
best action as a (K+1)-th member of the set: it enters the standardisation and the leave-one-out
baselines, and its own log-probability is pushed up by its (non-negative) advantage (self
imitation). Priority = relative lag of the current policy's best sample behind the stored best,
(L_policy - L_best) / (|L_best| + scale) + eps, scale = rms for pm and 1 for chi2. `--no-per`
turns the buffer off (fresh states only).
A fresh synthetic state's true parameters join its set the same way, as member K+1 and as the
first stored best when they beat the samples (ours; `--no-use_truth` turns this off); real states
have no truth, and a stored global-search answer (`train.py real_best`, data/real_best.json)
takes its place. Rewards are rank-shaped before standardisation (`--shaping raw` keeps -loss).
Exploration (issue 12): a share explore_frac of each state's K samples is uniform over the
cube; all K enter the rewards, baselines and the buffer's best action, and the gradient with
balance-heuristic weights pi / ((1 - e) pi + e) (see reinforce_loss). Evaluation logs the
samples' per-dimension std and the fraction at the box faces (eval_std_*, eval_face).

    python train.py train --run_dir runs/main
    python train.py train --run_dir runs/main --resume
    python train.py train --run_dir runs/no_per --no-per
    python train.py export runs/main/best.pt data/policy.pt
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import scipy.stats
import torch

import model
import spectuner
import states
from states import HOLDOUT, REAL_HOLDOUT, TRAIN_MOLECULES


@dataclasses.dataclass
class Config:
    command: str = "train"  # train; export (CKPT OUT: checkpoint -> policy file); real_best
    # (OUT: a global search on the real training windows, the known answer of real states)
    paths: list[str] = dataclasses.field(default_factory=list)  # export: CKPT OUT
    run_dir: str = "runs/main"  # checkpoints, metrics.csv, config.json, best.pt
    resume: bool = False  # continue from run_dir/ckpt.pt
    init: str = ""  # a policy file (e.g. data/policy.pt) whose weights start a new run; "" = none
    seed: int = 0  # seeds numpy, torch and every state
    device: str = "cpu"  # cpu or cuda[:N] (never required; an error if torch sees no GPU)
    threads: int = 1  # torch CPU threads
    workers: int = 0  # processes that make states and evaluate losses (0 = this one); results
    # do not depend on it
    n_steps: int = 300000  # gradient steps (total, counting resumed ones)
    batch_states: int = 16  # states per step
    k_samples: int = 16  # K actions per state
    lr: float = 3e-4  # Adam learning rate
    grad_clip: float = 1.0  # max gradient norm
    ent_coef: float = 0.03  # entropy bonus weight, 0 = off
    shaping: str = "rank"  # reward shaping before standardisation: rank (utilities) or raw
    resolution: float = 0.1  # rank shaping: rewards rounded to this, in units of the loss scale
    loss: str = "pm"  # pm (peak matching) or chi2
    per: bool = True  # prioritized replay; --no-per: fresh states only (ablation)
    use_truth: bool = True  # a synthetic state's true parameters join its first K set
    replay_frac: float = 0.5  # fraction of a step's states drawn from the buffer
    capacity: int = 4096  # buffer size (states), FIFO
    alpha: float = 0.6  # PER priority exponent
    beta0: float = 0.4  # PER importance exponent at step 0, annealed to 1
    beta_steps: int = 50000  # steps over which beta reaches 1
    eps: float = 1e-3  # PER priority floor, added by ReplayBuffer.update
    lag_cap: float = 10.0  # PER: a replayed state's relative lag is capped here before eps
    explore_frac: float = 0.25  # share of each state's K samples drawn uniformly over the cube
    molecules: list[str] = dataclasses.field(default_factory=lambda: list(TRAIN_MOLECULES))
    # target molecules of the synthetic training states (states.TRAIN_MOLECULES)
    holdout: list[str] = dataclasses.field(default_factory=lambda: list(HOLDOUT))  # molecules
    # of the held-out evaluation set, never trained on
    catalog: str = "../shared/data/catalogs"  # folder of .cat files; CH3OH is bundled
    real_dir: str = "../shared/data/spectra/iras16293b"  # real windows; "" = none
    real_frac: float = 0.15  # fraction of fresh states from the real spectra
    real_best: str = "data/real_best.json"  # known CH3OH answer of real states ("" = none)
    real_holdout: list[str] = dataclasses.field(default_factory=lambda: list(REAL_HOLDOUT))
    # spw numbers of the real windows never trained on (evaluate.py's real group fits them)
    forest_frac: float = 0.7  # fraction of the other fresh states from forest.py line forests
    forest_preset: str = "hot_corino"  # forest.PRESETS key of those states
    v_lsr: float = 2.7  # real spectra: systemic velocity [km/s]
    freq_lo_MHz: float = 80e3  # synthetic windows lie between these rest frequencies [MHz]
    freq_hi_MHz: float = 370e3  # (upper limit)
    max_windows: int = 3  # 1..max_windows windows per synthetic state
    width_MHz: list[float] = dataclasses.field(default_factory=lambda: [100.0, 500.0])  # window
    chan_kms: list[float] = dataclasses.field(default_factory=lambda: [0.1, 2.0])  # channel width
    max_chan: int = 4000  # channels per window at most (narrower window if needed)
    rms_K: list[float] = dataclasses.field(default_factory=lambda: [0.02, 0.5])  # noise range
    T_bg_max: float = 30.0  # continuum under the lines, uniform 0..T_bg_max in half the states [K]
    max_others: int = 4  # other molecules on top, 0..max_others
    p_absent: float = 0.1  # fraction of synthetic states without the target
    pool_size: int = 64  # fresh states waiting, binned by peak count
    fixed_states: int = 0  # >0: cycle through this many states only (toy problems, tests)
    d_model: int = 128  # policy width (ModelConfig)
    n_layers: int = 3  # transformer blocks
    max_tokens: int = 64  # transition tokens per molecule
    fine_len: int = 160  # fine patch bins (ModelConfig); 0 = none, as in policies before it
    hidden: int = 128  # flow conditioner width
    n_eval: int = 32  # evaluation states per set (trained molecules, held-out ones)
    eval_every: int = 250  # steps between evaluations (0 = never)
    ckpt_every: int = 1000  # steps between checkpoints
    ckpt_minutes: float = 5.0  # and at least this often [min]
    log_every: int = 20  # steps between log lines
    quiet: bool = False  # no log lines


GROUP_EDGES = np.array([1, 4, 16, 64])  # peak-count groups: 0, 1-3, 4-15, 16-63, 64+
METRICS = "step time_s reward best_loss adv_abs entropy beta n_replay buf it_s".split()
SPREAD_KEYS = [f"eval_std_{p}" for p in ("eta", "T_ex", "N_tot", "dv", "v_off")] + ["eval_face"]
EVAL_KEYS = ["eval_win_train", "eval_gain_train", "eval_win_hold", "eval_gain_hold"] + SPREAD_KEYS


def rank_utility(r: np.ndarray, resolution: float) -> np.ndarray:
    """Fitness shaping (Wierstra et al. 2014): max(0, log(S/2 + 1) - log(rank)), best rank 1.

    Rewards are first rounded to `resolution` (the loss scale of the state), so differences far
    below the noise tie (tied ranks are averaged). Heavy tails of the loss (a false line worth
    100 K) no longer dominate, and the best samples get the largest weight, as the best of
    N_init is what inference keeps (ours).
    """
    q = np.round(r / resolution) if resolution > 0 else r
    rank = scipy.stats.rankdata(-q, method="average")
    return np.maximum(0.0, np.log(len(r) / 2 + 1) - np.log(rank))


SHAPING = {"rank": rank_utility, "raw": lambda r, resolution: r}


def loo_advantage(r: np.ndarray) -> np.ndarray:
    """Rewards (S,) standardised, minus the leave-one-out mean of the other S-1 (method §6)."""
    z = (r - r.mean()) / r.std() if r.std() > 1e-12 else np.zeros_like(r)
    return z - (z.sum() - z) / (len(z) - 1)


def draw_actions(net, batch: dict, k: int, n_uniform: int, gen) -> np.ndarray:
    """K actions per state: k - n_uniform from pi(.|s), then n_uniform uniform on the cube.

    The uniform share keeps a collapsed policy finding other basins (the narrow-line basin of
    a real forest is ~1 % of the cube); its actions count in the rewards, the baselines and
    the buffer, and enter the gradient with the weights of reinforce_loss. (K, B, 5) float64.
    """
    B = batch["mask"].shape[0]
    with torch.no_grad():
        u = net.sample(batch, k - n_uniform, generator=gen)[0].double().cpu()  # (k - n_u, B, 5)
    uni = torch.rand(n_uniform, B, u.shape[-1], generator=gen, dtype=torch.float64)
    return torch.cat([u, uni], 0).numpy()  # (K, B, 5)


def reinforce_loss(logp, adv, w, frac_uniform: float, n_policy: int, ent_coef: float):
    """The policy-gradient and entropy terms of one step (method §6), as (pg, ent_term).

    Members i < K were drawn from the mixture q = (1 - e) pi + e U(0, 1)^5 (e = frac_uniform,
    the uniform density is 1 on the cube), member K is the state's best-known action (stored
    best or truth). Balance-heuristic importance weights rho_i = pi(u_i) / q(u_i) <= 1 / (1 - e)
    (detached) make the first term unbiased for the policy's own gradient; rho_K = 1:

        pg = -(1/B) sum_b (w_b / n_b) sum_i rho_ib A_ib log pi(u_ib | s_b)

    with A the leave-one-out advantages (0 where a member is missing), w_b the replay
    importance weights and n_b the members present. The entropy term, over the policy's own
    n_policy samples, is

        ent_term = ent_coef * mean_ib (log pi_ib - mean log pi) log pi_ib   (log pi detached
        in the first factor)

    whose gradient is ent_coef * E[log pi grad log pi] = -ent_coef grad H(pi) (score function;
    the mean is a baseline): minimising it raises the entropy.

    Args:
        logp: (K+1, B) log pi of every member. adv: (K+1, B). w: (B,) replay weights, divided
            by the members present. frac_uniform: e. n_policy: members drawn from pi.
    """
    K = logp.shape[0] - 1
    rho = torch.ones_like(logp)
    if frac_uniform > 0:
        lp = logp[:K].detach()
        log_q = torch.logaddexp(
            lp + math.log1p(-frac_uniform), torch.full_like(lp, math.log(frac_uniform))
        )
        rho[:K] = torch.exp(lp - log_q)
    pg = -(w * (rho * adv * logp).sum(0)).mean()
    lp_s = logp[:n_policy]
    ent_term = ent_coef * ((lp_s.detach() - lp_s.detach().mean()) * lp_s).mean()
    return pg, ent_term


class ReplayBuffer:
    """Prioritized replay (Schaul et al. 2016) of state ids with their best action and loss.

    A replayed state's priority is p = min(lag, lag_cap) + eps (update): the floor eps keeps
    every state drawable, the cap keeps one hopeless state (a lag of 1e3 after a false line)
    from taking the whole buffer's probability mass.
    """

    def __init__(self, capacity: int, alpha: float, eps: float, lag_cap: float = 10.0):
        self.capacity, self.alpha, self.eps, self.lag_cap = capacity, alpha, eps, lag_cap
        self.ids = np.zeros(capacity, dtype=np.int64)
        self.best_u = np.zeros((capacity, 5))
        self.best_loss = np.zeros(capacity)
        self.priority = np.zeros(capacity)
        self.size, self.pos, self.max_priority = 0, 0, 1.0

    def __len__(self) -> int:
        return self.size

    def add(self, sid: int, best_u: np.ndarray, best_loss: float) -> None:
        """A new state enters at the maximum priority seen so far, replacing the oldest."""
        i = self.pos
        self.ids[i], self.best_u[i], self.best_loss[i] = sid, best_u, best_loss
        self.priority[i] = self.max_priority
        self.pos, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)

    def probs(self) -> np.ndarray:
        p = self.priority[: self.size] ** self.alpha
        return p / p.sum()

    def sample(self, n: int, beta: float, rng) -> tuple:
        """n slots drawn with P(i) = p_i^alpha / sum p^alpha; weights (N P(i))^-beta / max."""
        P = self.probs()
        idx = rng.choice(self.size, n, replace=False, p=P)
        w = (self.size * P[idx]) ** -beta / (self.size * P.min()) ** -beta
        return idx, w

    def update(self, idx, lag, best_u, best_loss) -> None:
        """Slots idx get priority min(lag, lag_cap) + eps and their new best action and loss."""
        priority = np.minimum(lag, self.lag_cap) + self.eps
        self.priority[idx], self.best_u[idx], self.best_loss[idx] = priority, best_u, best_loss
        self.max_priority = max(self.max_priority, float(np.max(priority)))

    def state_dict(self) -> dict:
        keys = ("ids", "best_u", "best_loss", "priority")
        out = {k: torch.from_numpy(getattr(self, k)[: self.size].copy()) for k in keys}
        return out | dict(pos=self.pos, max_priority=self.max_priority)

    def load_state_dict(self, d: dict) -> None:
        n = len(d["ids"])
        for k in ("ids", "best_u", "best_loss", "priority"):
            getattr(self, k)[:n] = d[k].numpy()
        self.size, self.pos, self.max_priority = n, d["pos"], d["max_priority"]


def spread(u: np.ndarray, face: float = 0.01) -> dict:
    """Spread of policy samples u (n, B, 5) in the unit cube: per-dimension std (mean over the
    states) and the fraction of coordinates within `face` of a box face (a collapse sign)."""
    std = u.std(0).mean(0)  # (5,)
    out = dict(zip(SPREAD_KEYS, map(float, std)))
    out["eval_face"] = float(np.mean((u < face) | (u > 1.0 - face)))
    return out


def evaluate(net, states: list, rand_best: np.ndarray, box, cfg: Config, n: int = 50) -> tuple:
    """Best of n policy samples against the best of n uniform draws per state.

    Returns (fraction where the policy is lower by more than the resolution, mean of
    (L_rand - L_pol) / (|L_rand| + |L_pol| + resolution), in [-1, 1], spread of the samples).
    """
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        batch = model.collate([s["tokens"] for s in states], cfg.device)
        u = net.sample(batch, n, generator=gen)[0].double().cpu().numpy()  # (n, B, 5)
    pol = np.array([s["problem"](u[:, b]).min() for b, s in enumerate(states)])
    tol = np.array([cfg.resolution * s["loss_scale"] for s in states])  # ties below
    gain = (rand_best - pol) / (np.abs(rand_best) + np.abs(pol) + tol)
    return float(np.mean(pol < rand_best - tol)), float(gain.mean()), spread(u)


def save_checkpoint(path: Path, net, mcfg, opt, loop: dict, buf, pool, rng, gen) -> None:
    """Everything to resume, written atomically; readable with weights_only=True."""
    config = {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(mcfg).items()
    }
    ckpt = dict(
        config=config, state_dict=net.state_dict(), optimizer=opt.state_dict(),
        step=loop["step"], buffer=buf.state_dict(), pool=[s["sid"] for s in pool],
        next_id=loop["next_id"], np_rng=json.dumps(rng.bit_generator.state),
        torch_gen=gen.get_state(), best_score=loop["best_score"],
    )  # fmt: skip
    torch.save(ckpt, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def export(ckpt_path: str, out_path: str) -> None:
    """Write the policy (config + weights) of a checkpoint or policy file, as save_policy does."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    torch.save({"config": ckpt["config"], "state_dict": ckpt["state_dict"]}, out_path)
    net, _ = model.load_policy(out_path)  # fails loudly if the file is not a valid policy
    print(f"exported {ckpt_path} -> {out_path} params={sum(p.numel() for p in net.parameters())}")


def check_config(cfg: Config) -> None:
    """Reject options that cannot work, before anything is loaded (ValueError)."""
    if cfg.command != "train" or cfg.loss not in spectuner.LOSSES or cfg.shaping not in SHAPING:
        raise ValueError(
            f"command {cfg.command!r} / loss {cfg.loss!r} / shaping {cfg.shaping!r}: expected "
            f"train|export|real_best / {sorted(spectuner.LOSSES)} / {sorted(SHAPING)}"
        )
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r}: torch sees no CUDA device; use --device cpu")
    if not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise ValueError(f"device {cfg.device!r}: expected cpu or cuda[:N]")
    if not 0.0 <= cfg.explore_frac < 1.0:
        raise ValueError(f"explore_frac {cfg.explore_frac}: expected 0 <= value < 1")
    if cfg.workers < 0:
        raise ValueError(f"workers {cfg.workers}: expected 0 (this process) or more")


def model_config(cfg: Config) -> model.ModelConfig:
    return model.ModelConfig(
        d_model=cfg.d_model, n_layers=cfg.n_layers, ff_hidden=2 * cfg.d_model,
        max_tokens=cfg.max_tokens, hidden_features=(cfg.hidden, cfg.hidden),
        fine_len=cfg.fine_len,
    )  # fmt: skip


def eval_sets(ctx: dict, cfg: Config) -> tuple:
    """Fixed evaluation states (trained, held-out molecules), the best of 50 uniform draws on
    each, and their kinds (1, 2)."""
    kinds = [k for k, s in ((1, "train"), (2, "hold")) if cfg.eval_every and ctx[s]]
    evals = [[states.make_state(i, kind, ctx, cfg) for i in range(cfg.n_eval)] for kind in kinds]
    rand_best = [np.array([s["problem"](np.random.default_rng([cfg.seed, 9, i]).random((50, 5)))
                           .min() for i, s in enumerate(e)]) for e in evals]  # fmt: skip
    return evals, rand_best, kinds


def start(cfg: Config, mcfg, run: Path, rng, gen) -> tuple:
    """Network, optimiser, buffer and loop state (step, next_id, pool ids, best score): new,
    resumed from run/ckpt.pt, or started from the policy file cfg.init."""
    net = model.PolicyNet(mcfg).to(cfg.device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    buf = ReplayBuffer(cfg.capacity, cfg.alpha, cfg.eps, cfg.lag_cap)
    loop = dict(step=0, next_id=0, pool=[], best_score=-np.inf)
    if cfg.resume and (run / "ckpt.pt").exists():
        ck = torch.load(run / "ckpt.pt", map_location=cfg.device, weights_only=True)
        has_fine = any(".fine." in k for k in ck["state_dict"])
        if has_fine != (cfg.fine_len > 0):
            raise ValueError(f"--resume {run / 'ckpt.pt'}: its network has "
                             f"{'a' if has_fine else 'no'} fine patch; run with --fine_len "
                             f"{'160' if has_fine else '0'}")  # fmt: skip
        net.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        buf.load_state_dict(ck["buffer"])
        loop = {k: ck[k] for k in ("step", "next_id", "pool", "best_score")}
        rng.bit_generator.state = json.loads(ck["np_rng"])
        gen.set_state(ck["torch_gen"])
        print(f"resumed step={loop['step']} buf={len(buf)}")
    elif cfg.init:  # fine-tune: the weights of an exported policy of the same sizes
        init_net, init_cfg = model.load_policy(cfg.init, device=cfg.device)
        if init_cfg.fine_len == 0 and mcfg.fine_len > 0:  # starts as init_net, learns the bins
            try:
                init_net, init_cfg = model.upgrade(init_net, mcfg), mcfg
            except ValueError:
                pass  # reported below with both networks
        if init_cfg != mcfg:
            raise ValueError(f"--init {cfg.init}: its network {init_cfg} differs from {mcfg}")
        net.load_state_dict(init_net.state_dict())
        print(f"init={cfg.init}")
    return net, opt, buf, loop


def draw_batch(pool: list, buf, server, loop: dict, beta: float, rng, cfg: Config) -> tuple:
    """A step's states: fresh ones from the pool (a peak-count group uniformly, then a member;
    pixel binning, method §6), each replaced by a new state, then replayed ones from the buffer.
    Returns (states, replay slots, importance weights)."""
    n_rep = min(int(round(cfg.replay_frac * cfg.batch_states)), len(buf)) if cfg.per else 0
    chosen = []
    for _ in range(cfg.batch_states - n_rep):
        groups = np.searchsorted(GROUP_EDGES, [s["n_peaks"] for s in pool], side="right")
        g = rng.choice(np.unique(groups))
        chosen.append(pool.pop(int(rng.choice(np.flatnonzero(groups == g)))))
        pool.extend(server.make([new_id(loop, cfg)]))
    rep_idx, w_is = buf.sample(n_rep, beta, rng) if n_rep else (np.zeros(0, int), np.ones(0))
    return chosen + server.make(buf.ids[rep_idx]), rep_idx, w_is


def new_id(loop: dict, cfg: Config) -> int:
    """The next fresh state id (cycling over cfg.fixed_states when set)."""
    loop["next_id"] += 1
    sid = loop["next_id"] - 1
    return sid % cfg.fixed_states if cfg.fixed_states else sid


def score(batch_states: list, u, buf, rep_idx, n_fresh: int, server, cfg: Config) -> tuple:
    """Losses (K, B) of the actions and the set with member K (K+1, B, 5), (K+1, B): a replayed
    state's stored best action (self imitation), a fresh state's truth or known answer
    (use_truth, ours), else none (loss +inf)."""
    K, B = u.shape[:2]
    extra = [cfg.use_truth and b < n_fresh and s["u_true"] is not None
             for b, s in enumerate(batch_states)]  # fmt: skip
    U = [np.vstack([u[:, b], s["u_true"][None]]) if extra[b] else u[:, b]
         for b, s in enumerate(batch_states)]  # fmt: skip
    L = server.losses([s["sid"] for s in batch_states], U)
    losses = np.stack([x[:K] for x in L], 1)  # (K, B)
    u_all = np.concatenate([u, u[:1]], 0)  # (K+1, B, 5)
    l_all = np.concatenate([losses, np.full((1, B), np.inf)], 0)  # (K+1, B)
    for b in np.flatnonzero(extra):
        u_all[K, b], l_all[K, b] = batch_states[b]["u_true"], L[b][K]
    u_all[K, n_fresh:] = buf.best_u[rep_idx]
    l_all[K, n_fresh:] = buf.best_loss[rep_idx]
    return losses, u_all, l_all


def update_buffer(buf, batch_states, rep_idx, losses, u_all, l_all, n_policy, cfg) -> np.ndarray:
    """Fresh states enter at max priority with their best member; replayed ones get their lag
    (method §6) as priority. Returns the policy's own best loss per state (B,)."""
    B, n_fresh = len(batch_states), len(batch_states) - len(rep_idx)
    cols = np.arange(B)
    best_k = l_all.argmin(0)  # best of the K samples and member K
    best_u, best_l = u_all[best_k, cols], l_all[best_k, cols]
    pol_best = losses[:n_policy].min(0)
    if cfg.per:
        for b in range(n_fresh):
            buf.add(batch_states[b]["sid"], best_u[b], best_l[b])
        if len(rep_idx):
            r = cols[n_fresh:]
            scale = np.array([batch_states[i]["loss_scale"] for i in r])
            lag = (pol_best[r] - best_l[r]) / (np.abs(best_l[r]) + scale)
            buf.update(rep_idx, lag, best_u[r], best_l[r])
    return pol_best


def advantages(l_all: np.ndarray, batch_states: list, cfg: Config) -> np.ndarray:
    """Shaped, standardised leave-one-out advantages (K+1, B) of the members present (else 0);
    rank shaping ties rewards closer than cfg.resolution loss scales (method §6)."""
    valid = np.isfinite(l_all)
    adv = np.zeros(l_all.shape)
    for b, s in enumerate(batch_states):
        res = cfg.resolution * s["loss_scale"]
        adv[valid[:, b], b] = loo_advantage(SHAPING[cfg.shaping](-l_all[valid[:, b], b], res))
    return adv


def reinforce_step(net, opt, batch, u_all, adv, weights, n_uni: int, cfg: Config):
    """One Adam step on pg + ent_term of reinforce_loss; returns log pi of the members."""
    K = u_all.shape[0] - 1
    dev = dict(dtype=torch.float32, device=cfg.device)
    logp = net.log_prob(torch.as_tensor(u_all, **dev), batch)  # (K+1, B)
    pg, ent_term = reinforce_loss(logp, torch.as_tensor(adv, **dev),
                                  torch.as_tensor(weights, **dev), n_uni / K, K - n_uni,
                                  cfg.ent_coef)  # fmt: skip
    opt.zero_grad(set_to_none=True)
    (pg + ent_term).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    opt.step()
    return logp


def log_step(last: dict, net, evals, rand_best, kinds, box, run: Path, loop: dict, mcfg, cfg):
    """Evaluate when due (best.pt on a new best score), print and append metrics.csv."""
    if last.get("do_eval"):
        for e, rb, kind in zip(evals, rand_best, kinds):
            tag = ("train", "hold")[kind - 1]
            win, gain, sp = evaluate(net, e, rb, box, cfg)
            last[f"eval_win_{tag}"], last[f"eval_gain_{tag}"] = win, gain
            if kind == 1:  # spread on the fixed trained-molecule states
                last.update(sp)
        value = np.mean([last[k] for k in EVAL_KEYS if "gain" in k and k in last])
        if value > loop["best_score"]:
            loop["best_score"] = float(value)
            model.save_policy(run / "best.pt", net, mcfg)
    last.pop("do_eval", None)
    if not cfg.quiet:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in last.items()), flush=True)  # fmt: skip
    new = not (run / "metrics.csv").exists()
    with open(run / "metrics.csv", "a", newline="") as fh:
        writer = csv.DictWriter(fh, METRICS + EVAL_KEYS)
        if new:
            writer.writeheader()
        writer.writerow(last)


def main(cfg: Config) -> dict:
    """Train (or export, or real_best); returns the last logged metrics."""
    if cfg.command in ("export", "real_best"):
        want = {"export": 2, "real_best": 1}[cfg.command]
        if len(cfg.paths) != want:
            raise ValueError(f"{cfg.command} needs {('OUT', 'CKPT OUT')[want - 1]}, "
                             f"got {cfg.paths}")  # fmt: skip
        export(*cfg.paths) if cfg.command == "export" else states.real_best(cfg, cfg.paths[0])
        return {}
    check_config(cfg)
    # --- seed and device ---
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng, gen = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    mcfg = model_config(cfg)
    # --- data: molecules, real windows, evaluation states, the state server (§6) ---
    ctx = states.build_context(cfg, mcfg)
    evals, rand_best, kinds = eval_sets(ctx, cfg)
    # --- model, optimiser, buffer ---
    net, opt, buf, loop = start(cfg, mcfg, run, rng, gen)
    server = states.StateServer(ctx, cfg)
    pool = server.make(loop["pool"])
    pool += server.make([new_id(loop, cfg) for _ in range(cfg.pool_size - len(pool))])
    # --- loop ---
    K, t0, t_ckpt, step0, last = cfg.k_samples, time.time(), time.time(), loop["step"], {}
    n_uni = int(round(cfg.explore_frac * K))
    try:
        while loop["step"] < cfg.n_steps:
            step = loop["step"]
            beta = min(1.0, cfg.beta0 + (1.0 - cfg.beta0) * step / max(1, cfg.beta_steps))
            batch_states, rep_idx, w_is = draw_batch(pool, buf, server, loop, beta, rng, cfg)
            n_fresh = len(batch_states) - len(rep_idx)
            batch = model.collate([s["tokens"] for s in batch_states], cfg.device)
            u = draw_actions(net, batch, K, n_uni, gen)  # (K, B, 5): policy, then uniform
            losses, u_all, l_all = score(batch_states, u, buf, rep_idx, n_fresh, server, cfg)
            server.drop([s["sid"] for s in batch_states])
            adv = advantages(l_all, batch_states, cfg)  # (K+1, B)
            # --- REINFORCE step (method §6; the equations in reinforce_loss) ---
            weights = np.concatenate([np.ones(n_fresh), w_is])  # importance weights (1 if fresh)
            weights = weights / np.isfinite(l_all).sum(0)  # per member present
            logp = reinforce_step(net, opt, batch, u_all, adv, weights, n_uni, cfg)
            loop["step"] = step = step + 1
            # --- buffer, log, evaluate, checkpoint ---
            pol_best = update_buffer(buf, batch_states, rep_idx, losses, u_all, l_all, K - n_uni,
                                     cfg)  # fmt: skip
            do_eval = bool(cfg.eval_every and step % cfg.eval_every == 0 and evals)
            if step % cfg.log_every == 0 or step == cfg.n_steps or do_eval:
                el = time.time() - t0
                last = dict(step=step, time_s=round(el, 1), reward=float(-losses.mean()),
                            best_loss=float(pol_best.mean()), adv_abs=float(np.abs(adv).mean()),
                            entropy=float(-logp[: K - n_uni].detach().mean()),
                            beta=round(beta, 4), n_replay=len(rep_idx), buf=len(buf),
                            it_s=round((step - step0) / max(el, 1e-9), 3))  # fmt: skip
                last["do_eval"] = do_eval
                log_step(last, net, evals, rand_best, kinds, ctx["box"], run, loop, mcfg, cfg)
            due = time.time() - t_ckpt > 60 * cfg.ckpt_minutes
            if step % cfg.ckpt_every == 0 or step == cfg.n_steps or due:
                save_checkpoint(run / "ckpt.pt", net, mcfg, opt, loop, buf, pool, rng, gen)
                t_ckpt = time.time()
    finally:
        server.close()
    return last


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
    """Config from the command line (config_parser)."""
    commands = dict(choices=("train", "export", "real_best"))
    parser = config_parser(Config, positional=("command", "paths"), options={"command": commands},
                           description=__doc__)  # fmt: skip
    return Config(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    try:
        main(parse_config())
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
