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
(L_policy - L_best) / (|L_best| + scale) + eps, scale = rms for pm and 1 for chi2. `--per 0`
turns the buffer off (fresh states only).
A fresh synthetic state's true parameters join its set the same way, as member K+1 and as the
first stored best when they beat the samples (ours; `--use_truth 0` turns this off); real states
have no truth, and a stored global-search answer (`train.py real_best`, data/real_best.json)
takes its place. Rewards are rank-shaped before standardisation (`--shaping raw` keeps -loss).
Exploration (issue 12): a share explore_frac of each state's K samples is uniform over the
cube; all K enter the rewards, baselines and the buffer's best action, and the gradient with
balance-heuristic weights pi / ((1 - e) pi + e) (see reinforce_loss). Evaluation logs the
samples' per-dimension std and the fraction at the box faces (eval_std_*, eval_face).

    python train.py train --run_dir runs/main
    python train.py train --run_dir runs/main --resume 1
    python train.py train --run_dir runs/no_per --per 0
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
import time
from pathlib import Path

import numpy as np
import scipy.stats
import torch

import forest
import lte
import model
import spectuner

TRAIN_MOLECULES = (
    "CH3OH CH3CHO CH3CN CH3NC CH2CO HCOOH HCCNC HCCCHO Cyclopropenone Methoxy SO2 S-33-O2 "
    "S-34-O2 SOO-17 SOO-18 S-33-O S-34-O SO-18 OCS OC-13-S O-18-CS HDCO H2C-13-O H2CO-18 HC3N "
    "DC3N HC-13-CCN HCC-13-CN HCCC-13-N HCCCN-15 SiO Si-30-O SiO-18 CCH CCD C-13-CH CC-13-H "
    "C-13-N CN-15 DCN DNC HC-13-N HNC-13 HN-15-C N2D+ HCO-18+ CS+ CS-33 HC-13-S+ DCS+ HCS-34+"
).split()

REAL_HOLDOUT = ("85", "89", "105", "109")  # IRAS 16293-2422 B windows kept for evaluation
HOLDOUT = ("CH3OCHO", "CH3OCH3", "C2H3CN", "OCS-34")  # never trained on (nor in confusion)


@dataclasses.dataclass
class Config:
    command: str = "train"  # train; export (CKPT OUT: checkpoint -> policy file); real_best
    # (OUT: a global search on the real training windows, the known answer of real states)
    paths: list[str] = dataclasses.field(default_factory=list)  # export: CKPT OUT
    run_dir: str = "runs/main"  # checkpoints, metrics.csv, config.json, best.pt
    resume: int = 0  # 1 = continue from run_dir/ckpt.pt
    init: str = ""  # a policy file (e.g. data/policy.pt) whose weights start a new run; "" = none
    seed: int = 0  # seeds numpy, torch and every state
    device: str = "cpu"  # cpu or cuda[:N] (never required; an error if torch sees no GPU)
    threads: int = 1  # torch CPU threads
    n_steps: int = 300000  # gradient steps (total, counting resumed ones)
    batch_states: int = 16  # states per step
    k_samples: int = 16  # K actions per state
    lr: float = 3e-4  # Adam learning rate
    grad_clip: float = 1.0  # max gradient norm
    ent_coef: float = 0.03  # entropy bonus weight, 0 = off
    shaping: str = "rank"  # reward shaping before standardisation: rank (utilities) or raw
    resolution: float = 0.1  # rank shaping: rewards rounded to this, in units of the loss scale
    loss: str = "pm"  # pm (peak matching) or chi2
    per: int = 1  # 1 = prioritized replay, 0 = fresh states only (ablation)
    use_truth: int = 1  # 1 = a synthetic state's true parameters join its first K set
    replay_frac: float = 0.5  # fraction of a step's states drawn from the buffer
    capacity: int = 4096  # buffer size (states), FIFO
    alpha: float = 0.6  # PER priority exponent
    beta0: float = 0.4  # PER importance exponent at step 0, annealed to 1
    beta_steps: int = 50000  # steps over which beta reaches 1
    eps: float = 1e-3  # PER priority floor, added by ReplayBuffer.update
    lag_cap: float = 10.0  # PER: a replayed state's relative lag is capped here before eps
    explore_frac: float = 0.25  # share of each state's K samples drawn uniformly over the cube
    molecules: list[str] = dataclasses.field(default_factory=lambda: list(TRAIN_MOLECULES))
    holdout: list[str] = dataclasses.field(default_factory=lambda: list(HOLDOUT))  # eval only
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
LOSS_SCALE = {  # natural unit of each loss on a state: pm is in K, chi2 in units of sigma^2
    "pm": lambda s: float(np.mean([np.mean(w.rms_K) for w in s["problem"].windows])),
    "chi2": lambda s: 1.0,
}
EVAL_KEYS = ["eval_win_train", "eval_gain_train", "eval_win_hold", "eval_gain_hold"] + SPREAD_KEYS


def log_uniform(rng, lo_hi) -> float:
    return float(10 ** rng.uniform(*np.log10(lo_hi)))


def load_molecules(names: list, cfg: Config) -> dict:
    """{name: Molecule} restricted to the frequency range; entries that do not resolve are
    reported and skipped (the shared catalogue folder is optional), CH3OH is bundled."""
    out = {}
    catalog = cfg.catalog if cfg.catalog and Path(cfg.catalog).is_dir() else None
    for name in names:
        try:
            mol = lte.load_molecule(name, catalog if name != "CH3OH" else None)
        except ValueError as err:
            print(f"skip molecule={name} reason={str(err)[:80]!r}")
            continue
        mol = lte.select_lines(mol, cfg.freq_lo_MHz, cfg.freq_hi_MHz)
        if (mol.A_s > 0).sum() >= 1:
            out[name] = dataclasses.replace(mol, name=name)
    return out


def load_real(folder: str, v_lsr_kms: float, holdout=()) -> list:
    """Real windows (rest frame, method §9) from SPEC files and windows.csv, less the spw
    numbers in holdout (issue 12: they are evaluated, never trained on); [] if absent."""
    if not folder or not (Path(folder) / "windows.csv").exists():
        return []
    wins = []
    with open(Path(folder) / "windows.csv") as fh:
        for row in csv.DictReader(fh):
            if row["spw"] in set(map(str, holdout)):
                continue
            f, T = np.loadtxt(Path(folder) / f"spw{row['spw']}.dat", unpack=True)
            f = f * (1.0 + v_lsr_kms / lte.C_KMS)
            wins.append(spectuner.Window(f, T, float(row["rms_K"]), float(row["T_bg_K"]),
                                         float(row["beam_fwhm_arcsec"])))  # fmt: skip
    return wins


def synthetic_windows(rng, target, others: list, box: dict, cfg: Config) -> tuple:
    """1..max_windows windows on the target's strong lines, target + others + noise (§6 a).

    The target's parameters are uniform over the box, redrawn (up to 64 times) until its
    brightest channel exceeds 5 rms, except in a fraction p_absent of states, where it is
    either left out or kept at its first draw (often below the noise). Returns (windows, the
    target's true unit-cube parameters (5,) or None if left out).
    """
    T_rank = 10 ** rng.uniform(1.0, 2.5)  # which lines are strong depends on T_ex
    score = np.log10(target.A_s * target.g_u + 1e-300) - target.E_up_K / T_rank
    strong = np.argsort(-score)[:50]
    dv = log_uniform(rng, cfg.chan_kms)
    rms, beam = log_uniform(rng, cfg.rms_K), log_uniform(rng, (0.1, 30.0))
    T_bg = rng.uniform(0.0, cfg.T_bg_max) if rng.random() < 0.5 else 0.0
    grids = []
    for _ in range(int(rng.integers(1, cfg.max_windows + 1))):
        width = rng.uniform(*cfg.width_MHz)
        centre = target.freq_MHz[rng.choice(strong)] + rng.uniform(-0.4, 0.4) * width
        dnu = dv * centre / lte.C_KMS
        n = int(min(cfg.max_chan, max(16, width / dnu)))
        grids.append(centre + (np.arange(n) - n / 2) * dnu)
    absent = rng.random() < cfg.p_absent
    U = rng.random((64, 5))  # candidate target parameters
    T_target = [lte.spectrum(f, target, spectuner.to_physical(U, box), T_bg_K=T_bg) for f in grids]
    peak = np.max([np.abs(T).max(1) for T in T_target], axis=0)  # (64,)
    visible = np.flatnonzero(peak > 5 * rms)
    pick = 0 if absent else int(visible[0]) if visible.size else int(np.argmax(peak))
    keep_target = not (absent and rng.random() < 0.5)
    X = spectuner.to_physical(rng.random((len(others), 5)), box)  # one parameter set each
    wins = []
    for f, T_t in zip(grids, T_target):
        T = rng.normal(0.0, rms, f.size) + keep_target * T_t[pick]
        for mol, x in zip(others, X):
            T += lte.spectrum(f, mol, x[None], T_bg_K=T_bg)[0]
        wins.append(spectuner.Window(f, T, rms, T_bg, beam))
    return wins, U[pick] if keep_target else None


def make_state(sid: int, kind: int, ctx: dict, cfg: Config) -> dict:
    """State number sid of a stream (kind 0 training, 1 eval trained, 2 eval held-out).

    A draw whose target has no line within reach of its windows (a window at the edge of the
    catalogue's range) is drawn again from the next seed, up to 8 times.
    """
    for attempt in range(8):
        try:
            return _draw_state(sid, kind, ctx, cfg, attempt)
        except ValueError as err:
            if "has no line within" not in str(err) or attempt == 7:
                raise


def _draw_state(sid: int, kind: int, ctx: dict, cfg: Config, attempt: int) -> dict:
    """One draw of make_state; attempt 0 is the state's own seed."""
    seed = [cfg.seed, kind, sid] + ([attempt] if attempt else [])
    rng = np.random.default_rng(seed)
    targets = ctx["hold"] if kind == 2 else ctx["train"]
    real = kind != 2 and bool(ctx["real"]) and "CH3OH" in targets and rng.random() < cfg.real_frac
    if real:
        name = "CH3OH"
        pick = rng.choice(len(ctx["real"]), int(rng.integers(1, 4)), replace=False)
        wins, u_true = [ctx["real"][i] for i in sorted(pick)], ctx.get("real_u")
    elif ctx.get("forest") and rng.random() < cfg.forest_frac:
        return forest_state(sid, kind, rng, ctx, cfg)
    else:
        name = sorted(targets)[int(rng.integers(len(targets)))]
        pool = [m for m in sorted(ctx["train"]) if m != name]
        n_other = min(len(pool), int(rng.integers(0, cfg.max_others + 1)))
        others = [ctx["train"][pool[i]] for i in rng.choice(len(pool), n_other, replace=False)]
        wins, u_true = synthetic_windows(rng, targets[name], others, ctx["box"], cfg)
    return _state(sid, name, targets[name], wins, real, u_true, ctx, cfg)


def forest_state(sid: int, kind: int, rng, ctx: dict, cfg: Config) -> dict:
    """A line-forest state (forest.py, issue 11): a hot corino or hot core of many molecules
    sharing one velocity field, in one to three windows of an ALMA band where the target has
    lines. Training states (kinds 0, 1) never hold a held-out molecule, as target or forest;
    held-out states (kind 2) have a held-out target in a forest of the other molecules."""
    mols = ctx["forest"] if kind != 2 else ctx["forest_all"]
    names = sorted(n for n in mols if forest.is_excluded(n, cfg.holdout) == (kind == 2))
    name = names[int(rng.integers(len(names)))]
    bands = [b for b, (lo, hi) in sorted(forest.BANDS_GHZ.items())
             if lte.select_lines(mols[name], 1e3 * lo, 1e3 * hi).A_s.size]  # fmt: skip
    exclude = () if kind == 2 else tuple(cfg.holdout)
    band, n_win = bands[int(rng.integers(len(bands)))], int(rng.integers(1, cfg.max_windows + 1))
    wins, truth = forest.draw_forest(rng, mols, name, cfg.forest_preset, band, n_win, exclude)
    u = spectuner.to_unit(truth["params"][name][None], ctx["box"])[0]
    u_true = u if np.all((u >= 0) & (u <= 1)) else None  # outside the box: no truth to imitate
    state = _state(sid, name, mols[name], [spectuner.Window(*w) for w in wins], False, u_true,
                   ctx, cfg)  # fmt: skip
    return state | dict(forest=sorted(truth["params"]))  # the molecules in its spectrum


def _state(sid, name, mol, wins, real, u_true, ctx, cfg) -> dict:
    """The state record: its fitting problem (the fit's own loss, §4) and the policy's tokens."""
    fit = spectuner.Problem(wins, [mol], ctx["box"], cfg.loss)
    return dict(
        sid=sid, name=name, problem=fit, n_peaks=sum(c["obs"][2].size for c in fit.consts),
        real=real, u_true=u_true,
        tokens=model.make_tokens(fit.windows, spectuner.line_table(mol, ctx["mcfg"]), ctx["mcfg"]),
    )  # fmt: skip


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
    tol = np.array([cfg.resolution * LOSS_SCALE[cfg.loss](s) for s in states])  # ties below
    gain = (rand_best - pol) / (np.abs(rand_best) + np.abs(pol) + tol)
    return float(np.mean(pol < rand_best - tol)), float(gain.mean()), spread(u)


def save_checkpoint(path: Path, net, mcfg, opt, step, buf, pool, next_id, rng, gen, best) -> None:
    """Everything to resume, written atomically; readable with weights_only=True."""
    config = {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(mcfg).items()
    }
    ckpt = dict(
        config=config, state_dict=net.state_dict(), optimizer=opt.state_dict(), step=step,
        buffer=buf.state_dict(), pool=[s["sid"] for s in pool], next_id=next_id,
        np_rng=json.dumps(rng.bit_generator.state), torch_gen=gen.get_state(), best_score=best,
    )  # fmt: skip
    torch.save(ckpt, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def export(ckpt_path: str, out_path: str) -> None:
    """Write the policy (config + weights) of a checkpoint or policy file, as save_policy does."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    torch.save({"config": ckpt["config"], "state_dict": ckpt["state_dict"]}, out_path)
    net, _ = model.load_policy(out_path)  # fails loudly if the file is not a valid policy
    print(f"exported {ckpt_path} -> {out_path} params={sum(p.numel() for p in net.parameters())}")


def real_best(cfg: Config, out_path: str, restarts: int = 3) -> dict:
    """The best-known CH3OH answer on the real training windows, written to out_path (JSON).

    Real states have no truth (issue 12): the best of `restarts` pso+slsqp searches (seeds 0..)
    on all real training windows together, at the pm optimum (no chi2 refinement), stands in
    for it. Every real state is a subset of these windows of one source, so this answer is in
    the right basin of each. Its unit-cube point joins a real state's set as the truth of a
    synthetic one does.
    """
    wins = load_real(cfg.real_dir, cfg.v_lsr, cfg.real_holdout)  # rest frame
    if not wins:
        raise ValueError(f"real_best: no real windows in {cfg.real_dir!r} (windows.csv)")
    mol = load_molecules(["CH3OH"], cfg)["CH3OH"]  # as the real states have it
    fits = [spectuner.fit_spectrum(wins, [mol], method="pso+slsqp", loss=cfg.loss, seed=seed,
                                   chi2_refine=False) for seed in range(restarts)]  # fmt: skip
    best = min(fits, key=lambda r: r["loss"])
    spws = sorted(set(_real_spws(cfg.real_dir)) - set(map(str, cfg.real_holdout)), key=int)
    out = dict(molecule="CH3OH", params=best["params"]["CH3OH"], loss=best["loss"],
               loss_name=cfg.loss, spw=spws, v_lsr_kms=cfg.v_lsr, restarts=restarts,
               losses=[r["loss"] for r in fits], nfev=sum(r["nfev"] for r in fits),
               command=f"python train.py real_best {out_path}")  # fmt: skip
    Path(out_path).write_text(json.dumps(out, indent=1) + "\n")
    print(f"real_best loss={best['loss']:.4g} params={best['params']['CH3OH']} -> {out_path}")
    return out


def _real_spws(folder: str) -> list:
    """spw numbers listed in folder/windows.csv."""
    with open(Path(folder) / "windows.csv") as fh:
        return [row["spw"] for row in csv.DictReader(fh)]


def load_real_best(cfg: Config, box: dict):
    """Unit-cube point (5,) of cfg.real_best, or None (with the reason printed) if unusable."""
    path = Path(cfg.real_best) if cfg.real_best else None
    if path is None or not path.exists():
        print(f"skip=real_best reason='{cfg.real_best or 'none given'} is absent'")
        return None
    rec = json.loads(path.read_text())
    train_spws = sorted(set(_real_spws(cfg.real_dir)) - set(map(str, cfg.real_holdout)), key=int)
    if rec["spw"] != train_spws or rec["loss_name"] != cfg.loss:
        print(f"skip=real_best reason='{path} is for spw {rec['spw']} / {rec['loss_name']}, "
              f"training on {train_spws} / {cfg.loss}'")  # fmt: skip
        return None
    x = np.array([[rec["params"][p] for p in spectuner.PARAM_NAMES]])
    return spectuner.to_unit(x, box)[0]


def main(cfg: Config) -> dict:
    """Train (or export, or real_best); returns the last logged metrics."""
    if cfg.command == "export":
        if len(cfg.paths) != 2:
            raise ValueError(f"export needs CKPT OUT, got {cfg.paths}")
        export(*cfg.paths)
        return {}
    if cfg.command == "real_best":
        if len(cfg.paths) != 1:
            raise ValueError(f"real_best needs OUT, got {cfg.paths}")
        real_best(cfg, cfg.paths[0])
        return {}
    if cfg.command != "train" or cfg.loss not in spectuner.LOSSES or cfg.shaping not in SHAPING:
        raise ValueError(
            f"command {cfg.command!r} / loss {cfg.loss!r} / shaping {cfg.shaping!r}: expected "
            f"train|export / {sorted(spectuner.LOSSES)} / {sorted(SHAPING)}"
        )
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r}: torch sees no CUDA device; use --device cpu")
    if not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise ValueError(f"device {cfg.device!r}: expected cpu or cuda[:N]")
    if not 0.0 <= cfg.explore_frac < 1.0:
        raise ValueError(f"explore_frac {cfg.explore_frac}: expected 0 <= value < 1")
    # --- seed and device ---
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng, gen = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    mcfg = model.ModelConfig(
        d_model=cfg.d_model, n_layers=cfg.n_layers, ff_hidden=2 * cfg.d_model,
        max_tokens=cfg.max_tokens, hidden_features=(cfg.hidden, cfg.hidden),
        fine_len=cfg.fine_len,
    )  # fmt: skip
    # --- data: molecules, real windows, state pool binned by peak count (§6) ---
    if set(cfg.molecules) & set(cfg.holdout):
        raise ValueError(
            f"molecules both trained and held out: {set(cfg.molecules) & set(cfg.holdout)}"
        )
    box = spectuner.make_box(["target"])
    real = load_real(cfg.real_dir, cfg.v_lsr, cfg.real_holdout)
    ctx = dict(train=load_molecules(cfg.molecules, cfg), hold=load_molecules(cfg.holdout, cfg),
               real=real, box=box, mcfg=mcfg)  # fmt: skip
    ctx["real_u"] = load_real_best(cfg, box) if real else None
    if not ctx["train"]:
        raise ValueError(f"none of the training molecules {cfg.molecules} could be loaded")
    if cfg.forest_frac > 0 and cfg.catalog and Path(cfg.catalog).is_dir():
        ctx["forest_all"] = forest.load_forest_molecules(cfg.catalog, quiet=True)
        ctx["forest"] = {n: m for n, m in ctx["forest_all"].items()
                         if not forest.is_excluded(n, cfg.holdout)}  # fmt: skip
    elif cfg.forest_frac > 0:
        print(f"skip=forest reason='catalogue folder {cfg.catalog} is absent'")
    print(f"molecules train={len(ctx['train'])} hold={len(ctx['hold'])} real={len(ctx['real'])}")
    kinds = [k for k, s in ((1, "train"), (2, "hold")) if cfg.eval_every and ctx[s]]
    evals = [[make_state(i, kind, ctx, cfg) for i in range(cfg.n_eval)] for kind in kinds]
    rand_best = [np.array([s["problem"](np.random.default_rng([cfg.seed, 9, i]).random((50, 5)))
                           .min() for i, s in enumerate(e)]) for e in evals]  # fmt: skip
    # --- model and optimiser ---
    net = model.PolicyNet(mcfg).to(cfg.device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    buf = ReplayBuffer(cfg.capacity, cfg.alpha, cfg.eps, cfg.lag_cap)
    step, next_id, pool_ids, best_score = 0, 0, [], -np.inf
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
        step, next_id, pool_ids = ck["step"], ck["next_id"], ck["pool"]
        best_score = ck["best_score"]
        rng.bit_generator.state = json.loads(ck["np_rng"])
        gen.set_state(ck["torch_gen"])
        print(f"resumed step={step} buf={len(buf)}")
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

    def new_id():
        nonlocal next_id
        next_id += 1
        return (next_id - 1) % cfg.fixed_states if cfg.fixed_states else next_id - 1

    pool = [make_state(i, 0, ctx, cfg) for i in pool_ids]
    pool += [make_state(new_id(), 0, ctx, cfg) for _ in range(cfg.pool_size - len(pool))]
    # --- loop ---
    K, t0, t_ckpt, step0, last = cfg.k_samples, time.time(), time.time(), step, {}
    while step < cfg.n_steps:
        beta = min(1.0, cfg.beta0 + (1.0 - cfg.beta0) * step / max(1, cfg.beta_steps))
        n_rep = min(int(round(cfg.replay_frac * cfg.batch_states)), len(buf)) if cfg.per else 0
        states = []
        for _ in range(cfg.batch_states - n_rep):  # fresh: a peak-count group, then a member
            groups = np.searchsorted(GROUP_EDGES, [s["n_peaks"] for s in pool], side="right")
            g = rng.choice(np.unique(groups))
            states.append(pool.pop(int(rng.choice(np.flatnonzero(groups == g)))))
            pool.append(make_state(new_id(), 0, ctx, cfg))
        rep_idx, w_is = buf.sample(n_rep, beta, rng) if n_rep else (np.zeros(0, int), np.ones(0))
        states += [make_state(int(buf.ids[i]), 0, ctx, cfg) for i in rep_idx]
        B, n_fresh = len(states), len(states) - n_rep
        batch = model.collate([s["tokens"] for s in states], cfg.device)
        n_uni = int(round(cfg.explore_frac * K))
        u = draw_actions(net, batch, K, n_uni, gen)  # (K, B, 5): policy first, then uniform
        losses = np.stack([s["problem"](u[:, b]) for b, s in enumerate(states)], 1)  # (K, B)
        # member K: a replayed state's stored best action (self imitation), a fresh synthetic
        # state's true parameters (use_truth, ours), else none
        u_all = np.concatenate([u, u[:1]], 0)  # (K+1, B, 5)
        l_all = np.concatenate([losses, np.full((1, B), np.inf)], 0)  # (K+1, B)
        for b, s in enumerate(states[:n_fresh]):
            if cfg.use_truth and s["u_true"] is not None:
                u_all[K, b] = s["u_true"]
                l_all[K, b] = s["problem"](s["u_true"][None])[0]
        u_all[K, n_fresh:] = buf.best_u[rep_idx]
        l_all[K, n_fresh:] = buf.best_loss[rep_idx]
        valid = np.isfinite(l_all)
        adv = np.zeros((K + 1, B))
        for b, s in enumerate(states):
            res = cfg.resolution * LOSS_SCALE[cfg.loss](s)
            adv[valid[:, b], b] = loo_advantage(SHAPING[cfg.shaping](-l_all[valid[:, b], b], res))
        weights = np.concatenate([np.ones(n_fresh), w_is])  # importance weights (1 if fresh)
        # --- REINFORCE step (method §6; the equations in reinforce_loss) ---
        dev = dict(dtype=torch.float32, device=cfg.device)
        logp = net.log_prob(torch.as_tensor(u_all, **dev), batch)  # (K+1, B)
        pg, ent_term = reinforce_loss(
            logp,
            torch.as_tensor(adv, **dev),
            torch.as_tensor(weights / valid.sum(0), **dev),
            n_uni / K,
            K - n_uni,
            cfg.ent_coef,
        )
        lp_s = logp[: K - n_uni]
        opt.zero_grad(set_to_none=True)
        (pg + ent_term).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        # --- buffer: new states at max priority; replayed ones get their lag as priority ---
        cols = np.arange(B)
        best_k = l_all.argmin(0)  # best of the K samples and member K
        best_u, best_l = u_all[best_k, cols], l_all[best_k, cols]
        pol_best = losses[: K - n_uni].min(0)  # the policy's own best (lag, log)
        if cfg.per:
            for b in range(n_fresh):
                buf.add(states[b]["sid"], best_u[b], best_l[b])
            if n_rep:
                r = cols[n_fresh:]
                scale = [LOSS_SCALE[cfg.loss](states[i]) for i in r]
                lag = (pol_best[r] - best_l[r]) / (np.abs(best_l[r]) + scale)
                buf.update(rep_idx, lag, best_u[r], best_l[r])
        # --- log, evaluate, checkpoint ---
        do_eval = cfg.eval_every and step % cfg.eval_every == 0 and evals
        if step % cfg.log_every == 0 or step == cfg.n_steps or do_eval:
            el = time.time() - t0
            last = dict(step=step, time_s=round(el, 1), reward=float(-losses.mean()),
                        best_loss=float(pol_best.mean()), adv_abs=float(np.abs(adv).mean()),
                        entropy=float(-lp_s.detach().mean()), beta=round(beta, 4), n_replay=n_rep,
                        buf=len(buf), it_s=round((step - step0) / max(el, 1e-9), 3))  # fmt: skip
            if do_eval:
                for e, rb, kind in zip(evals, rand_best, kinds):
                    tag = ("train", "hold")[kind - 1]
                    win, gain, sp = evaluate(net, e, rb, box, cfg)
                    last[f"eval_win_{tag}"], last[f"eval_gain_{tag}"] = win, gain
                    if kind == 1:  # spread on the fixed trained-molecule states
                        last.update(sp)
                score = np.mean([last[k] for k in EVAL_KEYS if "gain" in k and k in last])
                if score > best_score:
                    best_score = float(score)
                    model.save_policy(run / "best.pt", net, mcfg)
            if not cfg.quiet:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in last.items()), flush=True)  # fmt: skip
            new = not (run / "metrics.csv").exists()
            with open(run / "metrics.csv", "a", newline="") as fh:
                writer = csv.DictWriter(fh, METRICS + EVAL_KEYS)
                if new:
                    writer.writeheader()
                writer.writerow(last)
        due = time.time() - t_ckpt > 60 * cfg.ckpt_minutes
        if step % cfg.ckpt_every == 0 or step == cfg.n_steps or due:
            save_checkpoint(run / "ckpt.pt", net, mcfg, opt, step, buf, pool, next_id, rng, gen,
                            best_score)  # fmt: skip
            t_ckpt = time.time()
    return last


def parse_config(argv: list[str] | None = None) -> Config:
    """Config from the command line: one option per field, help from its comment."""
    helps = dict(re.findall(r"^    (\w+):[^#]*#\s*(.*)$", inspect.getsource(Config), re.M))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = ("train", "export", "real_best")
    parser.add_argument("command", nargs="?", default="train", choices=commands)
    parser.add_argument("paths", nargs="*", help=helps.get("paths"))
    for f in dataclasses.fields(Config)[2:]:
        if f.type.startswith("list"):
            kind = float if "float" in f.type else str
            parser.add_argument(f"--{f.name}", nargs="+", type=kind, default=f.default_factory(),
                                help=helps.get(f.name))  # fmt: skip
        elif f.type == "bool":
            parser.add_argument(f"--{f.name}", action="store_true", help=helps.get(f.name))
        else:
            parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default,
                                help=helps.get(f.name))  # fmt: skip
    return Config(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main(parse_config())
