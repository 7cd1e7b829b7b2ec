"""One step of the policy gradient (docs/method.md §6): shaping, advantages, the K actions, the
REINFORCE, entropy and elite-imitation terms, and the replay-buffer side of a step.

"method §N" is a section of docs/method.md. train.py runs the loop; the functions here take its
Config as `cfg` (attributes only) and a replay.ReplayBuffer as `buf`.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats
import torch

import model
from replay import distinct_elites

SPREAD_KEYS = [f"eval_std_{p}" for p in ("eta", "T_ex", "N_tot", "dv", "v_off")] + ["eval_face"]


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


def imitation_loss(logp_e, present, w, coef: float):
    """Elite imitation (ours, issue 12): the mean negative log-likelihood of each replayed
    state's distinct good actions e (replay.distinct_elites),

        imit = -coef (1/B) sum_b w_b (1/m_b) sum_e log pi(e_b | s_b),

    with m_b the elites present and w_b the replay importance weights. It is the forward KL
    from the elites to the policy, up to a constant: mode covering, so a policy keeps mass on
    every basin that holds an elite, where the policy-gradient term alone (mode seeking) drops
    one of two equally good basins (tests/test_train.py, the two-basin toy).

    Args: logp_e (M, B) log pi of the elites; present (M, B) 1 where an elite exists; w (B,).
    """
    m = present.sum(0)
    per_state = (present * logp_e).sum(0) / m.clamp(min=1.0)
    return -coef * (w * per_state * (m > 0)).mean()


def spread(u: np.ndarray, face: float = 0.01) -> dict:
    """Spread of policy samples u (n, B, 5) in the unit cube: per-dimension std (mean over the
    states) and the fraction of coordinates within `face` of a box face (a collapse sign)."""
    std = u.std(0).mean(0)  # (5,)
    out = dict(zip(SPREAD_KEYS, map(float, std)))
    out["eval_face"] = float(np.mean((u < face) | (u > 1.0 - face)))
    return out


def evaluate(net, states: list, rand_best: np.ndarray, box, cfg, n: int = 50) -> tuple:
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


def score(batch_states: list, u, buf, rep_idx, n_fresh: int, server, cfg) -> tuple:
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


def stored_elites(buf, rep_idx, w_is, n_fresh: int, cfg):
    """The replayed states' stored elites as imitation targets: u (M, B, 5), present (M, B),
    weights (B,) (replay importance weights; fresh states have none), or None."""
    if not (cfg.n_elites and cfg.imit_coef and len(rep_idx)):
        return None
    B, M = n_fresh + len(rep_idx), cfg.n_elites
    u, present, w = np.full((M, B, 5), 0.5), np.zeros((M, B)), np.zeros(B)
    u[:, n_fresh:] = buf.elite_u[rep_idx].transpose(1, 0, 2)
    present[:, n_fresh:] = np.isfinite(buf.elite_loss[rep_idx]).T
    w[n_fresh:] = w_is
    return u, present, w


def update_buffer(buf, batch_states, rep_idx, losses, u_all, l_all, n_policy, cfg) -> np.ndarray:
    """Fresh states enter at max priority with their best member; replayed ones get their lag
    (method §6) as priority. Returns the policy's own best loss per state (B,)."""
    B, n_fresh = len(batch_states), len(batch_states) - len(rep_idx)
    cols = np.arange(B)
    best_k = l_all.argmin(0)  # best of the K samples and member K
    best_u, best_l = u_all[best_k, cols], l_all[best_k, cols]
    pol_best = losses[:n_policy].min(0)
    if cfg.per:
        eu, el = new_elites(buf, batch_states, rep_idx, u_all, l_all, cfg)
        for b in range(n_fresh):
            buf.add(batch_states[b]["sid"], best_u[b], best_l[b], (eu[b], el[b]))
        if len(rep_idx):
            r = cols[n_fresh:]
            scale = np.array([batch_states[i]["loss_scale"] for i in r])
            lag = (pol_best[r] - best_l[r]) / (np.abs(best_l[r]) + scale)
            buf.update(rep_idx, lag, best_u[r], best_l[r], (eu[r], el[r]))
    return pol_best


def new_elites(buf, batch_states, rep_idx, u_all, l_all, cfg) -> tuple:
    """Each state's distinct good actions (replay.distinct_elites) among its K + 1 members
    and, for a replayed state, its stored elites: (B, n_elites, 5), (B, n_elites)."""
    n_fresh, out_u, out_l = len(batch_states) - len(rep_idx), [], []
    for b, s in enumerate(batch_states):
        U, L = u_all[:, b], l_all[:, b]
        if b >= n_fresh:
            U = np.concatenate([U, buf.elite_u[rep_idx[b - n_fresh]]])
            L = np.concatenate([L, buf.elite_loss[rep_idx[b - n_fresh]]])
        e = distinct_elites(U, L, s["loss_scale"], cfg.n_elites, cfg.elite_dist, cfg.elite_tol)
        out_u.append(e[0])
        out_l.append(e[1])
    return np.array(out_u), np.array(out_l)


def advantages(l_all: np.ndarray, batch_states: list, cfg) -> np.ndarray:
    """Shaped, standardised leave-one-out advantages (K+1, B) of the members present (else 0);
    rank shaping ties rewards closer than cfg.resolution loss scales (method §6)."""
    valid = np.isfinite(l_all)
    adv = np.zeros(l_all.shape)
    for b, s in enumerate(batch_states):
        res = cfg.resolution * s["loss_scale"]
        adv[valid[:, b], b] = loo_advantage(SHAPING[cfg.shaping](-l_all[valid[:, b], b], res))
    return adv


def reinforce_step(net, opt, batch, u_all, adv, weights, n_uni: int, cfg, elites=None):
    """One Adam step on pg + ent_term of reinforce_loss, plus imitation_loss of the elites
    (u (M, B, 5), present (M, B), weights (B,)) when given; returns log pi of the members."""
    K = u_all.shape[0] - 1
    dev = dict(dtype=torch.float32, device=cfg.device)
    u_in = u_all if elites is None else np.concatenate([u_all, elites[0]])
    logp_in = net.log_prob(torch.as_tensor(u_in, **dev), batch)  # (K+1 [+ M], B)
    logp = logp_in[: K + 1]
    pg, ent_term = reinforce_loss(logp, torch.as_tensor(adv, **dev),
                                  torch.as_tensor(weights, **dev), n_uni / K, K - n_uni,
                                  cfg.ent_coef)  # fmt: skip
    total = pg + ent_term
    if elites is not None:
        present, w = (torch.as_tensor(x, **dev) for x in elites[1:])
        total = total + imitation_loss(logp_in[K + 1 :], present, w, cfg.imit_coef)
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    opt.step()
    return logp
