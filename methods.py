"""Search methods of a fit: where the starts come from and how they are refined (docs/method.md §7).

A method is a function (f, n_dim, n_init, rng, ...) -> (u, loss, nfev, status) of a batched
unit-cube objective f (problem.Problem); METHODS maps the names of the command line to them:
uniform random starts, particle swarms (pso), the matched filter of stack.py, or samples of the
policy network, each optionally refined by SLSQP or Nelder-Mead from the best distinct starts.
The second half turns the network (model.py, trained by train.py; docs/method.md §5) into
unit-cube starts for one spectrum (policy_sampler) or many in one batch (policy_starts).

    import methods
    u, loss, nfev, status = methods.METHODS["random+slsqp"](problem, 5, 50, rng, n_refine=2)
"""

from __future__ import annotations

from functools import lru_cache, partial
from pathlib import Path

import numpy as np

import stack
from optimise import pso, refine_nelder_mead, refine_slsqp
from problem import Problem, make_box, to_physical, to_unit

# --- methods (§7): a start (random, swarm or network) and a local refinement ---


DISTINCT = 0.05  # two starts are distinct when farther apart than this in the unit cube


def _then_local(f, u, loss, nfev, status, local):
    """The start (u, loss) after nfev runs, refined by `local` if given, its runs added."""
    if local is None:
        return u, loss, nfev, status
    u, loss, nfev_local, status = local(f, u, loss)
    return u, loss, nfev + nfev_local, status


def _refine_distinct(f, U, L, nfev, status, local, n_refine=1, source=None):
    """Refine the best n_refine distinct starts of U (n, n_dim) with losses L (n,), each more
    than DISTINCT (Euclidean, unit cube) from the better ones kept; the best result, with
    every refinement's runs added to nfev (ours, issue 12).

    With `source` (n,) labels (nn+stack+slsqp: network or matched filter), the picks take
    turns between the sources, best first within each, so a start of each source is refined
    even when the other's initial losses are all lower (a matched-filter start that looks good
    before refinement can end worse than a network start)."""
    source = np.zeros(len(L), int) if source is None else np.asarray(source)
    queues = [[i for i in np.argsort(L, kind="stable") if source[i] == k]
              for k in np.unique(source)]  # fmt: skip
    queues.sort(key=lambda q: L[q[0]])  # the source with the best start goes first
    picked, want = [], 1 if local is None else max(1, n_refine)
    while len(picked) < want and any(queues):
        for q in queues:
            while q and not all(np.linalg.norm(U[q[0]] - U[j]) > DISTINCT for j in picked):
                q.pop(0)
            if q and len(picked) < want:
                picked.append(q.pop(0))
    best = None
    for i in picked:
        run = _then_local(f, U[i], float(L[i]), 0, status, local)
        nfev += run[2]
        best = run if best is None or run[1] < best[1] else best
    return best[0], best[1], nfev, best[3]


def _with_extra(f, U, L, nfev, source, extra):
    """The starts U (n, n_dim), losses L, runs nfev and source labels, with `extra` (m, n_dim)
    unit-cube starts (e.g. the fits of a cube pixel's neighbours, cube_passes.py) evaluated in
    one call and joined as one more source, so that _refine_distinct takes turns with it."""
    source = np.zeros(len(L), int) if source is None else np.asarray(source)
    if extra is None or len(extra) == 0:
        return U, L, nfev, source
    E = np.clip(np.asarray(extra, dtype=float), 0.0, 1.0)
    return (np.vstack([U, E]), np.concatenate([L, f(E)]), nfev + len(E),
            np.concatenate([source, np.full(len(E), source.max() + 1)]))  # fmt: skip


def run_random_local(f, n_dim, n_init, rng, n_restarts=1, local=refine_slsqp, n_refine=1,
                     extra=None):  # fmt: skip
    """Best n_refine distinct of n_init uniform starts (and the `extra` starts, _with_extra)
    refined by a local optimiser (§7)."""
    U = rng.random((n_init, n_dim))
    U, L, nfev, source = _with_extra(f, U, f(U), n_init, None, extra)
    return _refine_distinct(f, U, L, nfev, "ok", local, n_refine, source)


def run_pso(f, n_dim, n_init, rng, n_restarts=1, local=None, n_refine=1, extra=None):
    """Best of n_restarts independent particle swarms (§7; n_init and extra are unused), then,
    if `local` is given (ours: pso+slsqp), a local polish from the best n_refine distinct swarm
    results.

    The swarm's stopping rule (15 cycles under 1e-5 relative gain) often fires while the best
    particle still lies on the floor of a long valley (eta-N_tot-T_ex of thin or broad lines),
    a few sigma from the minimum; a polish of tens to a few hundred runs takes it to the bottom.
    """
    runs = [pso(f, n_dim, rng) for _ in range(n_restarts)]
    U, L = np.array([r[0] for r in runs]), np.array([r[1] for r in runs])
    status = min(runs, key=lambda r: r[1])[3]
    return _refine_distinct(f, U, L, sum(r[2] for r in runs), status, local, n_refine)


def _stack_starts(f):
    """Matched-filter starts of stack.py for a Problem f: (U, L, model runs they cost)."""
    if not isinstance(f, Problem):
        raise ValueError("the stack methods need a problem.Problem objective (fit_spectrum)")
    nfev0 = f.nfev
    U, L = stack.candidates(f)
    return U, L, f.nfev - nfev0


def run_stack(f, n_dim, n_init, rng, n_restarts=1, local=None, n_refine=1, extra=None):
    """Velocity-stacking starts (stack.py: one matched filter per (T_ex, FWHM) template, a
    handful of model runs; n_init is unused) and the `extra` starts (_with_extra), the best
    n_refine distinct refined by `local`."""
    U, L, nfev = _stack_starts(f)
    U, L, nfev, source = _with_extra(f, U, L, nfev, None, extra)
    return _refine_distinct(f, U, L, nfev, "ok", local, n_refine, source)


def run_policy(f, n_dim, n_init, rng, n_restarts=1, local=None, propose=None, with_stack=False,
               n_refine=1, extra=None):  # fmt: skip
    """Best of n_init policy samples, refined by `local` if given (§7: nn, nn+slsqp, ...).

    propose(n) -> (n, n_dim) unit-cube starts from the network (see policy_sampler). With
    with_stack (nn+stack+slsqp, ours), the matched-filter starts of stack.py join the samples
    (their runs counted); the best n_refine distinct starts are refined, taking turns between
    the network's and the matched filter's (_refine_distinct).
    """
    U = propose(n_init)
    L, nfev = f(U), n_init
    source = np.zeros(n_init, int)
    if with_stack:
        U_s, L_s, nfev_s = _stack_starts(f)
        U, L, nfev = np.vstack([U, U_s]), np.concatenate([L, L_s]), nfev + nfev_s
        source = np.concatenate([source, np.ones(len(L_s), int)])
    U, L, nfev, source = _with_extra(f, U, L, nfev, source, extra)  # e.g. a cube's neighbours
    return _refine_distinct(f, U, L, nfev, "ok", local, n_refine, source)


METHODS = {
    "random+slsqp": run_random_local,
    "random+nelder-mead": partial(run_random_local, local=refine_nelder_mead),
    "pso": run_pso,
    "pso+slsqp": partial(run_pso, local=refine_slsqp),
    "pso+nelder-mead": partial(run_pso, local=refine_nelder_mead),
    "stack": run_stack,
    "stack+slsqp": partial(run_stack, local=refine_slsqp),
    "stack+nelder-mead": partial(run_stack, local=refine_nelder_mead),
    "nn": run_policy,
    "nn+slsqp": partial(run_policy, local=refine_slsqp),
    "nn+nelder-mead": partial(run_policy, local=refine_nelder_mead),
    "nn+stack+slsqp": partial(run_policy, local=refine_slsqp, with_stack=True),
}
DEFAULT_POLICY = Path(__file__).resolve().parent / "data" / "policy.pt"


# --- the policy network's proposals (§5, §7) ---


@lru_cache(maxsize=4)
def load_policy(path: str):
    """(net, model config) from a policy file written by train.py, on the CPU, cached by path.

    Raises:
        FileNotFoundError: no such file. ValueError: torch is not installed.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"policy file {path} not found (train one with train.py)")
    try:
        import model
    except ImportError as err:
        raise ValueError(f"the nn methods need torch ({err}); use random+slsqp") from None
    return model.load_policy(path, device="cpu")


def resolve_method(method: str, policy) -> tuple[str, str]:
    """'auto' -> nn+stack+slsqp when a policy is available, else random+slsqp; with the reason."""
    if method != "auto":
        return method, ""
    path = policy or DEFAULT_POLICY
    if not isinstance(path, (str, Path)) or Path(path).is_file():
        try:
            import torch  # noqa: F401

            return "nn+stack+slsqp", ""
        except ImportError:
            return "random+slsqp", "torch is not installed: random+slsqp instead of nn+slsqp"
    return "random+slsqp", f"no policy at {path}: random+slsqp instead of nn+slsqp"


def line_table(mol, mcfg) -> dict:
    """The arrays model.make_tokens reads for a molecule, with log10 Q at the model's
    temperatures; train.py builds its tokens with it too, so training and fitting agree."""
    table = {k: getattr(mol, k) for k in ("freq_MHz", "A_s", "g_u", "E_low_K", "E_up_K")}
    table["log10_Q"] = np.log10(mol.Q(np.asarray(mcfg.Q_temps_K, dtype=float)))
    return table


def _policy_tokens(mcfg, windows: list, molecules: list, box: dict):
    """Each molecule's tokens for one spectrum, or (None, reason) when the spectrum is outside
    what the network was trained on (a box beyond the training box, no transition in reach)."""
    import model

    train_box = make_box([m.name for m in molecules])
    if np.any(box["q_lo"] < train_box["q_lo"] - 1e-9) or np.any(
        box["q_hi"] > train_box["q_hi"] + 1e-9
    ):
        return None, "bounds reach beyond the box the network was trained on"
    tokens = []
    for mol in molecules:
        tokens.append(model.make_tokens(windows, line_table(mol, mcfg), mcfg))
        if tokens[-1]["spec"].shape[0] == 0:
            return None, f"{mol.name} has no transition in reach of the windows"
    return tokens, ""


def _policy_draw(net, token_sets: list, n: int, seeds: list, names: list, box: dict) -> np.ndarray:
    """n network samples for each of S spectra, the i-th samples of the molecules combined and
    mapped through the training box to `box`: (n, S, n_free). The encoder runs once over all
    spectra (batched); each spectrum's samples come from its own seed, so they do not depend on
    which other spectra share the batch. Samples that fall outside a `box` narrower than the
    training box are replaced by uniform draws inside it (clipping would pile them on its faces).
    """
    import torch

    import model

    k = len(names)
    batch = model.collate([t for tokens in token_sets for t in tokens])  # S * k states
    with torch.no_grad():
        context = net(batch)  # (S k, D)
        u = [net.flow.sample(context[i * k : (i + 1) * k], n,
                             torch.Generator().manual_seed(int(seed)))[0]
             for i, seed in enumerate(seeds)]  # fmt: skip
    u = torch.stack(u, 1).double().numpy().reshape(n * len(token_sets), 5 * k)  # (n S, 5 k)
    U = to_unit(to_physical(u, make_box(names)), box).reshape(n, len(token_sets), -1)
    for i, seed in enumerate(seeds):  # samples outside a narrower user box: uniform in it (ours)
        out = np.any((U[:, i] < 0) | (U[:, i] > 1), axis=1)
        U[out, i] = np.random.default_rng(int(seed)).random((n, U.shape[2]))[out]
    return U


def policy_sampler(policy, windows: list, molecules: list, box: dict, seed: int):
    """propose(n) -> (n, n_free) unit-cube starts from the network for one spectrum.

    Returns:
        (propose, reason): propose is None with the reason when the spectrum is outside what
        the network was trained on.
    """
    net, mcfg = load_policy(str(policy)) if isinstance(policy, (str, Path)) else policy
    tokens, reason = _policy_tokens(mcfg, windows, molecules, box)
    if tokens is None:
        return None, reason
    names = [m.name for m in molecules]
    return (lambda n: _policy_draw(net, [tokens], n, [seed], names, box)[:, 0]), ""


def policy_starts(spectra: list, molecules: list, n: int, seeds, policy=None,
                  bounds=None, fix=None, v_lsr_kms: float = 0.0) -> list:  # fmt: skip
    """Network starts for many spectra (e.g. cube pixels) in one batched call of the network.

    Args:
        spectra: list of window lists (each as for fit_spectrum). n: samples per spectrum.
        seeds: one seed per spectrum (as fit_spectrum's seed: the same starts as it would draw).
        policy, bounds, fix, v_lsr_kms: as for fit_spectrum.
    Returns:
        per spectrum, an (n, n_free) array of unit-cube starts for fit_spectrum(starts=...), or a
        string saying why the network cannot propose (fit_spectrum then uses random starts).
    """
    net, mcfg = (
        load_policy(str(policy or DEFAULT_POLICY)) if not isinstance(policy, tuple) else policy
    )
    names = [m.name for m in molecules]
    box = make_box(names, bounds, fix)
    out, token_sets, where = [], [], []
    seeds = np.broadcast_to(seeds, len(spectra))
    for windows in spectra:
        try:
            rest = Problem(windows, molecules, box, v_lsr_kms=v_lsr_kms).windows
            tokens, reason = _policy_tokens(mcfg, rest, molecules, box)
        except ValueError as err:
            tokens, reason = None, str(err)
        out.append(reason)
        if tokens is not None:
            token_sets.append(tokens)
            where.append(len(out) - 1)
    if token_sets:
        draws = _policy_draw(net, token_sets, n, [seeds[i] for i in where], names, box)
        for j, i in enumerate(where):
            out[i] = draws[:, j]
    return out


def network_starts(method: str, starts, policy, windows: list, molecules: list, box: dict,
                   seed: int) -> tuple[str, dict, str]:  # fmt: skip
    """The method to run and its keyword arguments, with the network's proposals (nn methods).

    Args:
        method: a key of METHODS. starts: None (draw here with policy_sampler), the reason
            string of policy_starts, or (n_init, n_free) starts drawn there.
        policy, windows (rest frame), molecules, box, seed: as for policy_sampler.
    Returns:
        (method, kw, fallback): an nn method gets kw = {"propose": ...}; where the network cannot
        propose (fallback says why), the method with random or stack starts instead, same
        refinement.
    """
    if not method.startswith("nn"):
        return method, {}, ""
    if starts is None:
        propose, fallback = policy_sampler(policy or DEFAULT_POLICY, windows, molecules, box, seed)
    elif isinstance(starts, str):  # policy_starts said why the network cannot propose
        propose, fallback = None, starts
    else:
        propose, fallback = (lambda n: starts[:n]), ""  # drawn elsewhere (policy_starts)
    if propose is None:  # outside what the network knows: random starts, same refinement
        method = {"nn": "random+slsqp", "nn+stack+slsqp": "stack+slsqp"}.get(
            method, method.replace("nn", "random")
        )
        return method, {}, fallback
    return method, {"propose": propose}, fallback
