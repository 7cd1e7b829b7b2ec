"""Prioritized replay of training states, with the distinct good actions found on each.

docs/method.md §6. A leaf module: numpy, and torch only for the checkpoint tensors.

The buffer holds state ids (a state is a function of its id, states.py), the best action and
loss found so far on each, a priority, and up to `n_elites` distinct good actions: the best
first, then others in other basins of the same state that are nearly as good. train.py imitates
the elites (forward KL, mode covering), which keeps a policy from dropping one of two equally
good basins; the policy gradient alone is mode seeking and does drop one.
"""

from __future__ import annotations

import numpy as np
import torch


def distinct_elites(U: np.ndarray, L: np.ndarray, scale: float, m: int, dist: float = 0.1,
                    tol: float = 0.05) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Up to m distinct good actions of the candidates U (n, 5) with losses L (n,).

    Best first; each next candidate is kept when it differs from every kept one by more than
    `dist` in some unit-cube coordinate (max norm) and its relative lag behind the best,
    (L - L_best) / (|L_best| + scale), is at most `tol` (the lag of the priority, method §6).
    Non-finite losses are never kept. Returns (m, 5) and (m,), padded with zeros and +inf.
    """
    out_u, out_l = np.zeros((m, U.shape[-1])), np.full(m, np.inf)
    finite = np.flatnonzero(np.isfinite(L))
    if m == 0 or finite.size == 0:
        return out_u, out_l
    order = finite[np.argsort(L[finite], kind="stable")]
    best, n = L[order[0]], 0
    for i in order:
        if (L[i] - best) / (abs(best) + scale) > tol:
            break
        if n and np.min(np.max(np.abs(out_u[:n] - U[i]), axis=1)) <= dist:
            continue
        out_u[n], out_l[n], n = U[i], L[i], n + 1
        if n == m:
            break
    return out_u, out_l


class ReplayBuffer:
    """Prioritized replay (Schaul et al. 2016) of state ids with their best action and loss.

    A replayed state's priority is p = min(lag, lag_cap) + eps (update): the floor eps keeps
    every state drawable, the cap keeps one hopeless state (a lag of 1e3 after a false line)
    from taking the whole buffer's probability mass. `elite_u` (capacity, n_elites, 5) and
    `elite_loss` hold each state's distinct good actions (distinct_elites; +inf where empty).
    """

    KEYS = ("ids", "best_u", "best_loss", "priority", "elite_u", "elite_loss")

    def __init__(self, capacity: int, alpha: float, eps: float, lag_cap: float = 10.0,
                 n_elites: int = 0):  # fmt: skip
        self.capacity, self.alpha, self.eps, self.lag_cap = capacity, alpha, eps, lag_cap
        self.ids = np.zeros(capacity, dtype=np.int64)
        self.best_u = np.zeros((capacity, 5))
        self.best_loss = np.zeros(capacity)
        self.priority = np.zeros(capacity)
        self.elite_u = np.zeros((capacity, n_elites, 5))
        self.elite_loss = np.full((capacity, n_elites), np.inf)
        self.size, self.pos, self.max_priority = 0, 0, 1.0

    def __len__(self) -> int:
        return self.size

    def add(self, sid: int, best_u, best_loss: float, elites: tuple | None = None) -> None:
        """A new state enters at the maximum priority seen so far, replacing the oldest;
        elites = (u (n_elites, 5), loss (n_elites,)), else none (+inf)."""
        i = self.pos
        self.ids[i], self.best_u[i], self.best_loss[i] = sid, best_u, best_loss
        self.elite_u[i], self.elite_loss[i] = elites if elites is not None else (0.0, np.inf)
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

    def update(self, idx, lag, best_u, best_loss, elites: tuple | None = None) -> None:
        """Slots idx get priority min(lag, lag_cap) + eps, their new best action and loss, and
        their new elites (u (n, n_elites, 5), loss (n, n_elites)) when given."""
        priority = np.minimum(lag, self.lag_cap) + self.eps
        self.priority[idx], self.best_u[idx], self.best_loss[idx] = priority, best_u, best_loss
        if elites is not None:
            self.elite_u[idx], self.elite_loss[idx] = elites
        self.max_priority = max(self.max_priority, float(np.max(priority)))

    def state_dict(self) -> dict:
        out = {k: torch.from_numpy(getattr(self, k)[: self.size].copy()) for k in self.KEYS}
        return out | dict(pos=self.pos, max_priority=self.max_priority)

    def load_state_dict(self, d: dict) -> None:
        """Also reads a buffer saved with another n_elites, or before elites existed (its best
        action becomes its first elite)."""
        n, m = len(d["ids"]), self.elite_u.shape[1]
        for k in self.KEYS[:4]:
            getattr(self, k)[:n] = d[k].numpy()
        if "elite_u" in d:
            k = min(m, d["elite_u"].shape[1])
            self.elite_u[:n, :k] = d["elite_u"][:, :k].numpy()
            self.elite_loss[:n, :k] = d["elite_loss"][:, :k].numpy()
        elif m:
            self.elite_u[:n, 0], self.elite_loss[:n, 0] = self.best_u[:n], self.best_loss[:n]
        self.size, self.pos, self.max_priority = n, d["pos"], d["max_priority"]
