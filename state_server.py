"""The state server of training (docs/method.md §6): states made and scored in this process, or
in `cfg.workers` forked worker processes that keep their states, with the same results.

State ids are dealt to the workers by id mod N; each worker builds and keeps its states (their
fitting problems), with a reference count per id, and only ids, tokens, actions and losses cross
between processes. A worker dies with its parent (Linux: PR_SET_PDEATHSIG).

    server = state_server.StateServer(states.build_context(cfg, mcfg), cfg)
    rec = server.make([0, 1])            # light records: tokens, n_peaks, u_true, loss_scale
    L = server.losses([0, 1], [U0, U1])  # each (K,) from state i's own fitting problem
"""

import multiprocessing
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

import states

_WORKER = {}  # in a worker process: ctx, cfg and its states {sid: [state, references]}


def _light(state: dict) -> dict:
    """A state without its fitting problem: what the training loop reads."""
    return {k: v for k, v in state.items() if k != "problem"}


def _init_worker(ctx: dict, cfg) -> None:
    """A worker (forked: ctx is inherited, not copied) dies with its parent (Linux)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # elsewhere the executor's own shutdown ends it
    _WORKER.update(ctx=ctx, cfg=cfg, states={})


def _make(store: dict, ctx: dict, cfg, sid: int, kind: int) -> dict:
    """State sid of store, made if absent; each call adds one reference."""
    if sid not in store:
        store[sid] = [states.make_state(sid, kind, ctx, cfg), 0]
    store[sid][1] += 1
    return store[sid][0]


def _drop(store: dict, sids) -> None:
    for sid in sids:
        if sid in store:
            store[sid][1] -= 1
            if store[sid][1] <= 0:
                del store[sid]


def _worker_make(sids: list, kind: int) -> list:
    return [_light(_make(_WORKER["states"], _WORKER["ctx"], _WORKER["cfg"], s, kind)) for s in sids]


def _worker_losses(sids: list, U: list) -> list:
    return [_WORKER["states"][s][0]["problem"](u) for s, u in zip(sids, U)]


def _worker_drop(sids: list) -> None:
    _drop(_WORKER["states"], sids)


class StateServer:
    """Training states by id, made and scored here (cfg.workers 0) or in worker processes.

    State sid lives in worker sid % workers from make to drop, so its fitting problem is built
    once and never crosses a process boundary; only tokens, ids, actions and losses do. Every
    state and loss is a function of the ids and actions alone, so the results do not depend on
    the number of workers. Each make adds a reference and each drop removes one.
    """

    def __init__(self, ctx: dict, cfg):
        self.ctx, self.cfg, self.n = ctx, cfg, int(cfg.workers)
        self.store = {}
        fork = multiprocessing.get_context("fork")
        self.pools = [ProcessPoolExecutor(1, fork, _init_worker, (ctx, cfg)) for _ in range(self.n)]

    def _split(self, sids) -> dict:
        """{worker: [positions in sids]}."""
        out = {}
        for i, s in enumerate(sids):
            out.setdefault(int(s) % self.n, []).append(i)
        return out

    def _scatter(self, fn, sids: list, items, *args) -> list:
        """fn(its sids[, their items], *args) in each worker holding them, all at once; the
        results gathered back in the order of sids."""
        parts = self._split(sids)
        jobs = {}
        for w, p in parts.items():
            mine = ([items[i] for i in p],) if items is not None else ()
            jobs[w] = self.pools[w].submit(fn, [sids[i] for i in p], *mine, *args)
        out = [None] * len(sids)
        for w, p in parts.items():
            for i, result in zip(p, jobs[w].result()):
                out[i] = result
        return out

    def make(self, sids, kind: int = 0) -> list:
        """Light records (state without "problem") of states sids, in order."""
        sids = [int(s) for s in sids]
        if not self.n:
            return [_light(_make(self.store, self.ctx, self.cfg, s, kind)) for s in sids]
        return self._scatter(_worker_make, sids, None, kind)

    def losses(self, sids, U) -> list:
        """Loss of each state sids[i] at its actions U[i] (n_i, 5), in order."""
        sids = [int(s) for s in sids]
        if not self.n:
            return [self.store[s][0]["problem"](u) for s, u in zip(sids, U)]
        return self._scatter(_worker_losses, sids, U)

    def drop(self, sids) -> None:
        """One reference less to each of sids; a state with none is forgotten."""
        sids = [int(s) for s in sids]
        if not self.n:
            return _drop(self.store, sids)
        for w, p in self._split(sids).items():
            self.pools[w].submit(_worker_drop, [sids[i] for i in p]).result()

    def close(self) -> None:
        for p in self.pools:
            p.shutdown(cancel_futures=True)
