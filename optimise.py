"""Optimisers in the unit cube for batched objectives, and Gauss-Newton errors (docs/method.md §7).

Every objective here is f(U (B, n) in [0, 1]^n) -> losses (B,): one call evaluates a whole
batch, and every point is counted (nfev): the comparison of docs/method.md §8 is about that
count.
numpy and scipy only: the module works when copied alone.

    import numpy as np, optimise
    f = lambda U: ((U - 0.3) ** 2).sum(1)
    u0, f0, n0 = optimise.random_starts(f, 5, 50, np.random.default_rng(0))
    u, loss, nfev, status = optimise.refine_slsqp(f, u0, f0)
    u, loss, nfev, status = optimise.pso(f, 5, np.random.default_rng(0))
"""

import numpy as np
from scipy.optimize import least_squares, minimize
from scipy.stats import qmc

FD_STEP = 1e-5  # forward-difference step in the unit cube (gradients and Gauss-Newton)


def random_starts(f, n_dim: int, n_init: int, rng: np.random.Generator):
    """Best of n_init uniform draws, evaluated in one call. Returns (u, loss, nfev)."""
    U = rng.random((n_init, n_dim))
    L = f(U)
    return U[np.argmin(L)], float(np.min(L)), n_init


def refine_slsqp(f, u0: np.ndarray, f0: float, maxiter: int = 100):
    """SLSQP with bounds [0, 1] from u0 (loss f0). Returns (u, loss, nfev, status).

    It stops when the loss changes by less than f.ftol (an attribute the objective may carry:
    the change that the noise does not resolve; default 1e-6), or after f.maxiter iterations
    (another such attribute; default `maxiter`).

    The gradient is by forward differences (a backward step at the upper bound) with every
    perturbed point in ONE batched call of f: the numpy model is cheaper per point in a batch,
    and the pm loss (peak finding) has no autograd path. Values and gradients are cached by x,
    so no point is evaluated twice; nfev counts every point, gradients included.
    """
    cache = {u0.tobytes(): [f0, None]}  # x -> [loss, gradient or None]
    nfev = 0

    def value(x):
        nonlocal nfev
        if x.tobytes() not in cache:
            cache[x.tobytes()] = [float(f(x[None])[0]), None]
            nfev += 1
        return cache[x.tobytes()][0]

    def gradient(x):
        nonlocal nfev
        entry = cache.setdefault(x.tobytes(), [None, None])
        if entry[1] is None:
            h = np.where(x + FD_STEP <= 1.0, FD_STEP, -FD_STEP)
            points = x + np.diag(h) if entry[0] is not None else np.vstack([x, x + np.diag(h)])
            vals = f(points)
            nfev += len(points)
            entry[0] = entry[0] if entry[0] is not None else float(vals[0])
            entry[1] = (vals[-x.size :] - entry[0]) / h
        return entry[1]

    res = minimize(
        value,
        u0,
        jac=gradient,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * u0.size,
        options={"maxiter": getattr(f, "maxiter", maxiter), "ftol": getattr(f, "ftol", 1e-6)},
    )
    return _better(res, u0, f0, nfev)


def refine_nelder_mead(f, u0: np.ndarray, f0: float, maxfev: int = 1000):
    """Nelder-Mead with bounds [0, 1] from u0 (loss f0). Returns (u, loss, nfev, status)."""
    nfev = 0

    def value(x):
        nonlocal nfev
        nfev += 1
        return float(f(x[None])[0])

    res = minimize(
        value,
        u0,
        method="Nelder-Mead",
        bounds=[(0.0, 1.0)] * u0.size,
        options={"maxfev": maxfev, "xatol": 1e-4, "fatol": 1e-6},
    )
    return _better(res, u0, f0, nfev)


def _better(res, u0, f0, nfev):
    """The better of the refined point and the start (§7), with nfev and a status string."""
    message = str(res.message)
    limit = "limit" in message.lower() or "maximum" in message.lower()
    status = "ok" if res.success else ("maxiter" if limit else message)
    if np.isfinite(res.fun) and res.fun < f0:
        return np.clip(res.x, 0.0, 1.0), float(res.fun), nfev, status
    return u0, f0, nfev, status


def reflect(X: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reflective bounds on [0, 1]: fold positions back in, flip velocity on odd reflections."""
    odd = np.mod(np.floor(X), 2) == 1
    X = np.mod(X, 2.0)
    return np.where(X > 1.0, 2.0 - X, X), np.where(odd, -V, V)


def pso(
    f,
    n_dim: int,
    rng: np.random.Generator,
    n_particles: int = 28,
    inertia: float = 0.729,
    c1: float = 1.49,
    c2: float = 1.49,
    min_cycles: int = 100,
    max_cycles: int = 1000,
    patience: int = 15,
    tol: float = 1e-5,
):
    """Particle swarm of §7, one batched call of f per generation. Returns (u, loss, nfev, status).

    Latin-hypercube start, start velocities uniform within the box (ours), reflective bounds;
    stops after min_cycles once the global best improved by less than tol (relative) for
    patience cycles in a row, or after max_cycles (status "maxiter").
    """
    X = qmc.LatinHypercube(d=n_dim, seed=rng).random(n_particles)
    V = rng.uniform(-X, 1.0 - X)  # as SPSO 2011: a first step stays inside the box
    best_X, best_L = X.copy(), f(X)
    nfev, stall, g = n_particles, 0, np.argmin(best_L)
    for cycle in range(1, max_cycles + 1):
        r1, r2 = rng.random((2, *X.shape))
        V = inertia * V + c1 * r1 * (best_X - X) + c2 * r2 * (best_X[g] - X)
        X, V = reflect(X + V, V)
        L = f(X)
        nfev += n_particles
        old, better = best_L[g], L < best_L
        best_X[better], best_L[better] = X[better], L[better]
        g = np.argmin(best_L)
        stall = stall + 1 if (old - best_L[g]) < tol * max(abs(old), 1e-300) else 0
        if cycle >= min_cycles and stall >= patience:
            return best_X[g], float(best_L[g]), nfev, "ok"
    return best_X[g], float(best_L[g]), nfev, "maxiter"


def gauss_newton_errors(resid, u: np.ndarray, names: list[str], max_cond: float = 1e8):
    """1-sigma errors in the unit cube from H = J^T J of the noise-normalised residuals.

    Args:
        resid: U (B, n) -> (B, M) residuals (T_obs - T_model) / sigma, one batched call.
        u: optimum (n,) in the unit cube.
        names: parameter names (n,), for the notes.
        max_cond: eigenvalue ratio of the correlation form of H above which directions are
            called degenerate.

    Returns:
        sigma_u (n,) (NaN where degenerate), notes {index: reason}, nfev (n + 1).
    """
    h = np.where(u + FD_STEP <= 1.0, FD_STEP, -FD_STEP)
    R = resid(np.vstack([u, u + np.diag(h)]))  # (n + 1, M)
    J = (R[1:] - R[0]) / h[:, None]  # (n, M)
    H = J @ J.T  # Gauss-Newton Hessian of 0.5 sum(resid^2)
    d = np.sqrt(np.diag(H))
    ok = np.flatnonzero(d > 1e-12 * max(d.max(), 1e-300))
    notes = {i: "no effect on the model" for i in set(range(u.size)) - set(ok)}
    w, V = np.linalg.eigh(H[np.ix_(ok, ok)] / np.outer(d[ok], d[ok]))  # correlation form
    small = w < w.max() / max_cond if ok.size else w < 0
    for k in np.flatnonzero(small):
        involved = ok[np.abs(V[:, k]) > 0.3]
        for i in involved:
            others = ", ".join(names[j] for j in involved if j != i) or "the others"
            notes[i] = f"degenerate with {others} (condition number > {max_cond:.0e})"
    sigma = np.full(u.size, np.nan)
    sigma[ok] = np.sqrt(np.diag((V[:, ~small] / w[~small]) @ V[:, ~small].T)) / d[ok]
    sigma[list(notes)] = np.nan
    return sigma, notes, u.size + 1


def bound_flags(u: np.ndarray, tol: float = 1e-3) -> np.ndarray:
    """Per coordinate of u (n,): "lower" or "upper" within tol of a face of [0, 1]^n, else ""."""
    u = np.asarray(u, dtype=float)
    return np.where(u <= tol, "lower", np.where(u >= 1.0 - tol, "upper", ""))


def profile_crossing(f, x_grid: np.ndarray, delta: float, f_below=np.inf, F=None, n_fine=33):
    """Upper crossing of a 1-D profile: the smallest x above its minimum where f rises by delta.

    f(x (n,)) -> (n,) is called once on x_grid (increasing; skipped when its values F are
    given) and once on n_fine points between the two grid points that bracket the crossing,
    then interpolated linearly. f_below is a value attained below the grid (e.g. at zero
    signal) that counts as a candidate minimum.

    Returns:
        (x_cross, f_min, nfev): x_cross is +inf when f stays below f_min + delta on the whole
        grid, and x_grid[0] when it is already above it there (the crossing lies below the grid).
    """
    nfev = 0 if F is not None else x_grid.size
    F = f(x_grid) if F is None else np.asarray(F)
    i_min = int(np.argmin(F))
    f_min = min(float(F[i_min]), f_below)
    start = 0 if f_below <= F[i_min] else i_min
    above = np.flatnonzero(F[start:] >= f_min + delta) + start
    if above.size == 0:
        return np.inf, f_min, nfev
    j = int(above[0])
    if j == 0:
        return float(x_grid[0]), f_min, nfev
    x_fine = np.linspace(x_grid[j - 1], x_grid[j], n_fine)
    F_fine = f(x_fine)
    k = int(np.flatnonzero(F_fine >= f_min + delta)[0]) if (F_fine >= f_min + delta).any() else -1
    if k <= 0:  # not monotonic within the bracket: the grid point is the bound
        return float(x_grid[j]), f_min, nfev + n_fine
    t = (f_min + delta - F_fine[k - 1]) / (F_fine[k] - F_fine[k - 1])
    return float(x_fine[k - 1] + t * (x_fine[k] - x_fine[k - 1])), f_min, nfev + n_fine


def refine_least_squares(resid, u0: np.ndarray, keep=None, max_nfev: int = 50):
    """Noise-weighted least squares from u0 in [0, 1]^n: min 0.5 sum_c r_c(u)^2 over channels keep.

    scipy's trust-region reflective solver with bounds [0, 1]; the Jacobian by forward
    differences (a backward step at the upper bound), all n + 1 points in one batched call.

    Args:
        resid: U (B, n) -> (B, M) residuals (T_obs - T_model) / sigma.
        u0: start (n,). keep: channel index or mask into M (None = all). max_nfev: solver steps.

    Returns:
        (u, chi2 at u, chi2 at u0, nfev); u = u0 when the solver does not lower chi2.
    """
    keep = slice(None) if keep is None else keep
    nfev = 0

    def fun(x):
        nonlocal nfev
        nfev += 1
        return resid(x[None])[0, keep]

    def jac(x):
        nonlocal nfev
        h = np.where(x + FD_STEP <= 1.0, FD_STEP, -FD_STEP)
        R = resid(np.vstack([x, x + np.diag(h)]))[:, keep]
        nfev += x.size + 1
        return ((R[1:] - R[0]) / h[:, None]).T

    r0 = fun(u0)
    start = np.clip(u0, 1e-9, 1.0 - 1e-9)  # the solver starts strictly inside the bounds
    res = least_squares(fun, start, jac=jac, bounds=(0.0, 1.0), x_scale="jac", max_nfev=max_nfev)
    chi2_0, chi2 = float(r0 @ r0), float(res.fun @ res.fun)
    if np.isfinite(chi2) and chi2 < chi2_0:
        return np.clip(res.x, 0.0, 1.0), chi2, chi2_0, nfev
    return u0, chi2_0, chi2_0, nfev
