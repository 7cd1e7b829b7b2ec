"""One fitting problem: observed windows, molecules and a parameter box, and its loss.

Built once per spectrum (docs/method.md §3-§4): the windows taken to the rest frame and sorted by
frequency, each molecule's lines within reach of them, the observed peaks, and the constants
of the losses. Calling it on unit-cube points U (B, n_free) gives the loss (B,), computed only
on the channels the model lines reach (cost ~ lines x channels per line, not the band), equal
to the loss over every channel; `resid` gives the noise-normalised residuals and `chi2_x` their
sum of squares (at the cost of the touched channels). Every model run is counted in `nfev`.
fit_spectrum, fit_cube, train and evaluate all use it, so the reward the policy is trained on
is the loss it is used with.

    import numpy as np, lte, problem
    mol = lte.load_molecule("CH3OH")
    box = problem.make_box(["CH3OH"])
    fit = problem.Problem([problem.Window(freq_MHz, T_K, 0.1)], [mol], box, loss="pm")
    L = fit(np.random.default_rng(0).random((50, 5)))  # (50,), fit.nfev == 50
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

import losses
import lte


class Window(NamedTuple):
    """One observed window: channel centres (observed frame, as in the file), brightness, noise
    (scalar or per channel), continuum under the lines and interferometer beam FWHM."""

    freq_MHz: np.ndarray
    T_obs_K: np.ndarray
    rms_K: float | np.ndarray
    T_bg_K: float = 0.0
    beam_arcsec: float | None = None


PARAM_NAMES = ("eta", "T_ex", "N_tot", "delta_v", "v_off")
IS_LOG = np.array([True, True, True, True, False])  # §3: the box is linear in log10 of these
ETA_MAX = 1.0 - 1e-6  # eta = 1 would be an infinite source (§3: capped just below 1)
DEFAULT_BOUNDS = {
    "eta": (1e-3, ETA_MAX),
    "T_ex": (3.0, 1000.0),
    "N_tot": (1e12, 1e20),
    "delta_v": (0.3, 30.0),
    "v_off": (-12.0, 12.0),
}


# --- parameter box (§3) ---


def make_box(mol_names: list[str], bounds: dict | None = None, fix: dict | None = None) -> dict:
    """Box of the 5 k parameters of k molecules in internal coordinates q (log10 where IS_LOG).

    Args:
        mol_names: molecule names, in parameter order.
        bounds: {NAME or "MOL:NAME": (lo, hi)} in physical units, overriding DEFAULT_BOUNDS.
        fix: {NAME or "MOL:NAME": value} in physical units; these are not optimised.

    Returns:
        dict with q_lo, q_hi (5 k,), x_fix (5 k,) physical (NaN where free), free and log (5 k,)
        bool, names (5 k,) "MOL:NAME".

    Raises:
        ValueError: unknown molecule or parameter name, lo >= hi, or a non-positive log parameter.
    """
    n = 5 * len(mol_names)
    lo, hi = np.tile([[DEFAULT_BOUNDS[p][i] for p in PARAM_NAMES] for i in (0, 1)], len(mol_names))
    value = np.full(n, np.nan)
    for table, is_range in ((bounds or {}, True), (fix or {}, False)):
        for key, val in table.items():
            for i in _param_indices(key, mol_names):
                lo_i, hi_i = val if is_range else (val, val)
                if is_range and not lo_i < hi_i:
                    raise ValueError(f"bounds for {key}: low {lo_i} must be below high {hi_i}")
                if IS_LOG[i % 5] and lo_i <= 0:
                    raise ValueError(f"{key}={lo_i}: {PARAM_NAMES[i % 5]} must be positive")
                lo[i], hi[i] = (lo_i, hi_i) if is_range else (lo[i], hi[i])
                value[i] = np.nan if is_range else val
    log = np.tile(IS_LOG, len(mol_names))
    q_lo, q_hi = (np.where(log, np.log10(np.where(log, a, 1.0)), a) for a in (lo, hi))
    names = [f"{m}:{p}" for m in mol_names for p in PARAM_NAMES]
    return dict(q_lo=q_lo, q_hi=q_hi, x_fix=value, free=np.isnan(value), log=log, names=names)


def _param_indices(key: str, mol_names: list[str]) -> list[int]:
    """Indices into the 5 k vector for "NAME" (every molecule) or "MOL:NAME"."""
    mol, _, name = key.rpartition(":")
    if name not in PARAM_NAMES:
        raise ValueError(
            f"unknown parameter {key!r}; expected [MOL:]NAME with NAME in {PARAM_NAMES}"
        )
    if mol and mol not in mol_names:
        raise ValueError(f"unknown molecule {mol!r} in {key!r}; fitted molecules: {mol_names}")
    return [5 * k + PARAM_NAMES.index(name) for k, m in enumerate(mol_names) if mol in ("", m)]


def to_physical(U: np.ndarray, box: dict) -> np.ndarray:
    """Free unit-cube coordinates U (B, n_free) -> physical parameters (B, 5 k)."""
    U = np.clip(np.atleast_2d(U), 0.0, 1.0)
    free, log = box["free"], box["log"][box["free"]]
    X = np.tile(box["x_fix"], (U.shape[0], 1))  # fixed values exactly as given
    q = box["q_lo"][free] + U * (box["q_hi"][free] - box["q_lo"][free])
    X[:, free] = np.where(log, 10.0**q, q)
    return X


def to_unit(X: np.ndarray, box: dict) -> np.ndarray:
    """Physical parameters X (B, 5 k) -> free unit-cube coordinates (B, n_free), the inverse."""
    X = np.atleast_2d(X)
    q = np.where(box["log"], np.log10(np.where(box["log"], X, 1.0)), X)[:, box["free"]]
    lo, hi = box["q_lo"][box["free"]], box["q_hi"][box["free"]]
    return (q - lo) / (hi - lo)


def reach_kms(box: dict) -> float:
    """How far (km/s) beyond a window a line centre can lie and still reach it in the box."""
    v = np.concatenate([box[k][4::5] for k in ("q_lo", "q_hi", "x_fix")])
    fwhm = np.concatenate([10 ** box["q_hi"][3::5], box["x_fix"][3::5]])
    return lte.reach_kms(float(np.nanmax(np.abs(v))), float(np.nanmax(fwhm)))


class Problem:
    """The loss of k molecules' LTE model against observed windows, over a parameter box.

    Args:
        windows: Windows in the observed frame; nu_rest = nu_obs (1 + v_lsr / c) (method §3).
        molecules: lte.Molecule list, in the box's order; their intensities add (docs/method.md §2).
        box: from make_box. loss: "pm" or "chi2"; the losses of the windows add up.
        v_lsr_kms: systemic velocity. dish_m: single-dish diameter: eta is then the value at
            the data centre nu_ref, eta(nu) = theta^2 / (theta^2 + theta_beam(nu)^2) with
            theta_beam ~ 1 / nu (docs/method.md §2).

    Raises:
        ValueError: no window, a window with fewer than 2 channels, non-finite values or a
            noise that is not positive, an unknown loss, or a molecule with no line in reach.
    """

    def __init__(self, windows, molecules, box: dict, loss: str = "pm", v_lsr_kms: float = 0.0,
                 dish_m: float | None = None):  # fmt: skip
        if loss not in losses.LOSSES:
            raise ValueError(f"loss {loss!r}: expected one of {sorted(losses.LOSSES)}")
        if not windows:
            raise ValueError("no spectral window given")
        self.box, self.loss_name, self.molecules = box, loss, list(molecules)
        self.n_free, self.nfev = int(box["free"].sum()), 0
        margin = reach_kms(box)
        self.windows, self.lines, self.consts = [], [], []
        for j, w in enumerate(windows):
            win = _rest_frame(w, v_lsr_kms, j)
            f = win.freq_MHz
            lo, hi = f[0] * (1 - margin / lte.C_KMS), f[-1] * (1 + margin / lte.C_KMS)
            self.windows.append(win)
            self.lines.append([lte.select_lines(m, lo, hi) for m in self.molecules])
            self.consts.append(losses.window_constants(win.T_obs_K, win.rms_K))
        for k, m in enumerate(self.molecules):
            if all(lines[k].freq_MHz.size == 0 for lines in self.lines):
                ranges = ", ".join(f"{w.freq_MHz[0]:.1f}-{w.freq_MHz[-1]:.1f}"
                                   for w in self.windows)  # fmt: skip
                raise ValueError(f"molecule {m.name} has no line within {margin:.0f} km/s of the "
                                 f"windows (rest frame, MHz): {ranges}")  # fmt: skip
        lo = min(w.freq_MHz[0] for w in self.windows)
        self.nu_ref = 0.5 * (lo + max(w.freq_MHz[-1] for w in self.windows)) if dish_m else None
        self.n_chan = sum(w.freq_MHz.size for w in self.windows)
        # SLSQP's stopping tolerance (optimise.refine_slsqp), SLSQP's default. Tried (issue 10,
        # docs/benchmarks.md): 1 % of a unit of chi2 for the chi2 loss cut random+slsqp's runs by
        # 12 % at the same recovery, but pso+slsqp recovered 81 instead of 83 of 100 truths;
        # looser tolerances for pm stopped some fits far from their minimum.
        self.ftol = 1e-6
        # SLSQP's iteration limit per refinement (fit_spectrum's maxiter): on clean cubes 10
        # gives the same maps as 100 at half the CPU, since the chi2 refinement that follows
        # sets the values (docs/benchmarks.md §4)
        self.maxiter = 100

    def _params(self, X: np.ndarray, j: int, k: int) -> np.ndarray:
        """Molecule k's parameters (B, 5) in window j: eta at the window for a single dish."""
        p = X[:, 5 * k : 5 * k + 5].copy()
        if self.nu_ref is not None:  # theta_beam ~ 1/nu: eta = theta^2 / (theta^2 + theta_b^2)
            nu_c = self.windows[j].freq_MHz.mean()
            p[:, 0] = p[:, 0] / (p[:, 0] + (1 - p[:, 0]) * (self.nu_ref / nu_c) ** 2)
        return p

    def model(self, X: np.ndarray) -> list[np.ndarray]:
        """Summed model of the molecules per window on every channel, X (B, 5 k) physical ->
        list of (B, C) [K] (docs/method.md §2). Not counted in nfev (outputs and plots)."""
        X = np.atleast_2d(X)
        return [self._model_window(X, j) for j in range(len(self.windows))]

    def _model_on(self, X: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(channels idx, model (B, n) there) of window j: the channels the lines reach, with
        one more on each side of each run; the model is 0 on every other channel."""
        w = self.windows[j]
        layouts = [(lte.line_layout(w.freq_MHz, mol, self._params(X, j, k)))
                   for k, mol in enumerate(self.lines[j]) if mol.freq_MHz.size]  # fmt: skip
        reach = [lte.touched_channels(lay) for lay in layouts]
        idx = lte.covering(*map(np.concatenate, zip(*reach)), w.freq_MHz.size, 1) if reach else []
        T = np.zeros((len(X), len(idx)))
        for lay in layouts:
            T += lte.render(lay, w.T_bg_K, True, idx)
        return np.asarray(idx, dtype=int), T

    def __call__(self, U: np.ndarray) -> np.ndarray:
        """Loss of unit-cube points U (B, n_free) -> (B,), summed over the windows (§4)."""
        X = to_physical(U, self.box)
        self.nfev += len(X)
        total = np.zeros(len(X))
        for j, win in enumerate(self.consts):
            idx, T = self._model_on(X, j)
            exact = lambda b: self._dense_loss(X[b : b + 1], j)[0]  # noqa: E731
            total += losses.LOSSES_ON[self.loss_name](T, idx, win, exact)
        return total

    def _dense_loss(self, X: np.ndarray, j: int) -> np.ndarray:
        """Loss of window j from the model on every channel (the definition, §4)."""
        w = self.windows[j]
        T = self._model_window(X, j)
        return losses.LOSSES[self.loss_name](T, w.T_obs_K, w.rms_K, self.consts[j]["obs"])

    def _model_window(self, X: np.ndarray, j: int) -> np.ndarray:
        """Model of window j alone on every channel, (B, C)."""
        w = self.windows[j]
        T = np.zeros((len(X), w.freq_MHz.size))
        for k, mol in enumerate(self.lines[j]):
            if mol.freq_MHz.size:
                T += lte.spectrum(w.freq_MHz, mol, self._params(X, j, k), w.T_bg_K)
        return T

    def loss_dense(self, U: np.ndarray) -> np.ndarray:
        """The loss from models on every channel: what __call__ must equal (tests, bench)."""
        X = to_physical(U, self.box)
        self.nfev += len(X)
        return sum(self._dense_loss(X, j) for j in range(len(self.windows)))

    def resid_x(self, X: np.ndarray) -> np.ndarray:
        """resid at physical parameters X (B, 5 k), e.g. N_tot scans beyond the box (limits);
        not counted in nfev."""
        return np.concatenate([(w.T_obs_K - T) / w.rms_K
                               for w, T in zip(self.windows, self.model(X))], axis=1)  # fmt: skip

    def chi2_x(self, X: np.ndarray) -> np.ndarray:
        """sum over every channel of every window of resid_x(X)^2, X (B, 5 k) physical -> (B,),
        from the model on the channels the lines reach (losses.chi2_on adds the constant of
        the others), e.g. the N_tot scans of the limits; not counted in nfev."""
        X = np.atleast_2d(X)
        total = np.zeros(len(X))
        for j, win in enumerate(self.consts):
            idx, T = self._model_on(X, j)
            total += 2.0 * win["T_obs"].size * losses.chi2_on(T, idx, win)  # chi2_on: 0.5 mean
        return total

    def resid(self, U: np.ndarray) -> np.ndarray:
        """Noise-normalised residuals (T_obs - T_model) / rms of every channel of every
        window, U (B, n_free) -> (B, n_chan), counted in nfev (Gauss-Newton errors)."""
        X = to_physical(U, self.box)
        self.nfev += len(X)
        return self.resid_x(X)


def _rest_frame(w, v_lsr_kms: float, j: int) -> Window:
    """Window w in the rest frame, channels ascending in frequency, rms per channel.

    Raises:
        ValueError: fewer than 2 channels, shapes that differ, non-finite values, rms <= 0.
    """
    freq = np.asarray(w.freq_MHz, dtype=float) * (1.0 + v_lsr_kms / lte.C_KMS)
    T = np.asarray(w.T_obs_K, dtype=float)
    if freq.ndim != 1 or freq.size < 2 or T.shape != freq.shape:
        raise ValueError(f"window {j}: expected >= 2 channels of frequency and brightness of "
                         f"equal length, got {freq.shape} and {T.shape}")  # fmt: skip
    rms = np.broadcast_to(np.asarray(w.rms_K, dtype=float), freq.shape)
    T_bg = np.asarray(w.T_bg_K, dtype=float)
    bad = [n for n, a in (("frequency", freq), ("brightness", T), ("rms", rms), ("T_bg", T_bg))
           if not np.isfinite(a).all()]  # fmt: skip
    if bad or not (rms > 0).all():
        raise ValueError(f"window {j}: non-finite {bad} or rms <= 0 (min {rms.min():.3g} K)")
    order = np.argsort(freq, kind="stable")
    T_bg = T_bg[order] if T_bg.ndim else float(T_bg)
    return Window(freq[order], T[order], rms[order], T_bg, w.beam_arcsec)
