"""The sub-channel kernel of the LTE model (docs/method.md §2): how finely each spectrum's
channels are split, and the channel averages of amp (1 - exp(-tau)) of Gaussian lines on them.
lte.py builds the lines' positions and opacities and calls these two; numpy and scipy only, so
the module works when copied alone.

    n_sub, K, simpson = subchannels.plan(s_chan, tau_peak)      # per row of a batch
    T = subchannels.average_channels(C, n_sub[0], K[0], x, s, tau, amp, simpson[0])

On import it keeps glibc from returning the kernel's MB-sized temporaries to the system
(keep_freed_memory).
"""

import ctypes
import math

import numpy as np
from scipy.special import erf

N_SIGMA_MAX = 8.0  # a line's opacity is kept out to this many sigma (at most; see plan)


def keep_freed_memory(mmap_MB: int = 32, trim_MB: int = 64) -> bool:
    """Let glibc serve allocations below mmap_MB from its heap and keep up to trim_MB of freed
    memory, instead of mapping fresh zero pages for every MB-sized temporary of the kernel.

    Page faults on those fresh pages were half the cost of a batched spectrum on the project's
    machines (docs/benchmarks.md §1). Called on import; the only effect is that the process
    keeps up to trim_MB of freed memory. A no-op (False) where the C library has no mallopt.
    """
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-3, mmap_MB << 20)) and bool(libc.mallopt(-1, trim_MB << 20))
    except (OSError, AttributeError, TypeError):  # not glibc: leave the allocator as it is
        return False


keep_freed_memory()  # M_MMAP_THRESHOLD (-3) and M_TRIM_THRESHOLD (-1) of glibc's malloc.h


def plan(s_chan, tau_peak, k_per_sigma=4.0, n_sub_max=64):
    """Sub-channels per channel for each row, the half-window of sub-channels per line, and
    the quadrature (Simpson where a sub-channel is at most sigma/2, else exact erf).

    A row needs fine sub-channels when its lines are narrow against the channel and not
    optically thin: the edges of a saturated line (where tau ~ 1) are steeper than the line,
    by sqrt(2 ln tau_peak), and must be resolved for the channel average (docs/method.md §2). Each
    choice is a function of the row alone, so a spectrum does not depend on its batch.
    Args: s_chan, tau_peak (B, L): line sigma in channels, peak opacity.
    Returns: n_sub (B,) and K (B,) powers of 2, simpson (B,) bool.
    """
    tmax = np.maximum.reduce(tau_peak, axis=-1)
    s_min = np.minimum.reduce(s_chan, axis=-1)
    if tmax.size == 1:  # one row: the same operations on python floats (numpy's log, log1p)
        return _plan_one(float(tmax[0]), float(s_min[0]), float(s_chan.max()), k_per_sigma,
                         n_sub_max)  # fmt: skip
    need = k_per_sigma * np.sqrt(1.0 + 2.0 * np.log1p(tmax)) / s_min  # steepness / sigma
    n_sub = np.minimum(np.maximum(np.ceil(need), 1.0), n_sub_max)
    n_sub[tmax < 1e-3] = 1.0
    n_sub = np.int64(1) << np.frexp(n_sub - 1.0)[1]  # next power of 2: few values, few groups
    reach = np.minimum(np.sqrt(2.0 * np.log(np.maximum(tmax, 1.0) / 1e-6)), N_SIGMA_MAX)
    K = np.int64(1) << np.frexp(np.ceil(reach * np.maximum.reduce(s_chan, axis=-1) * n_sub))[1]
    return n_sub, K, s_min * n_sub >= 2.0


def _plan_one(tmax, s_min, s_max, k_per_sigma, n_sub_max):
    """`plan` of one row from floats, bit-identical to the batched arrays: (1,) arrays."""
    need = k_per_sigma * math.sqrt(1.0 + 2.0 * float(np.log1p(tmax))) / s_min
    n_sub = 1.0 if tmax < 1e-3 else min(max(np.ceil(need), 1.0), n_sub_max)
    n_sub = 1 << math.frexp(n_sub - 1.0)[1]  # next power of 2
    reach = min(math.sqrt(2.0 * float(np.log(max(tmax, 1.0) / 1e-6))), N_SIGMA_MAX)
    K = 1 << math.frexp(np.ceil(reach * s_max * n_sub))[1]
    return np.array([n_sub]), np.array([K]), np.array([s_min * n_sub >= 2.0])


def average_channels(C, n_sub, K, x, s, tau_chan, amp, simpson):
    """Channel averages of amp * (1 - exp(-tau)), tau on n_sub sub-channels per channel.

    tau(nu) = sum_t tau_t G(nu; mu_t, sigma_t) (docs/method.md §2), in channel-index units. Each
    line's
    opacity on a sub-channel is its exact mean there: the unit-area Gaussian's mass from erf
    differences, or Simpson's rule on the sub-channel when it is at most sigma/2 (exact to
    ~1e-5). A line touches only the 2K+1 sub-channels around its centre (docs/method.md §2, Cost).
    Args: C channels; x, s (b, L) line centre and sigma [channels]; tau_chan (b, L) integrated
        opacity [channels]; amp (b, C) [K]; simpson: the quadrature.
    Returns: (b, C) [K].
    """
    b, L = x.shape
    pad = 2 * K + 1  # sub-channels of padding at each end: clipped centres land there
    Fp = n_sub * C + 2 * pad
    j0 = np.minimum(np.maximum(np.floor(x * n_sub), -K - 1), n_sub * C + K)  # centre sub-channel
    scale = 1.0 / (math.sqrt(2.0) * s)  # (b, L): z = (nu - mu) / (sqrt(2) sigma)
    dz = (scale / n_sub)[..., None]  # sub-channel width in z
    z0 = ((j0 - x * n_sub) / n_sub * scale)[..., None]  # (b, L, 1)
    weight = (tau_chan * n_sub)[..., None]  # integrated opacity per sub-channel of unit mass
    if simpson:  # in place: these arrays are the kernel's largest
        g_edge = np.multiply(np.arange(-K, K + 2.0), dz)  # (b, L, 2K+2) sub-channel edges
        tau_bin = np.multiply(np.arange(-K, K + 1.0) + 0.5, dz)  # (b, L, 2K+1) mid-points
        for g in (g_edge, tau_bin):  # exp(-z^2) there
            g += z0
            np.square(g, out=g)
            np.negative(g, out=g)
            np.exp(g, out=g)
        tau_bin *= 4.0
        tau_bin += g_edge[..., :-1]
        tau_bin += g_edge[..., 1:]
        tau_bin *= weight * dz * (-1.0 / (6.0 * math.sqrt(math.pi)))  # -mean opacity there
    else:
        z = z0 + np.arange(-K, K + 2) * dz  # (b, L, W+1) sub-channel edges
        tau_bin = erf(z)
        tau_bin = weight * -0.5 * (tau_bin[..., 1:] - tau_bin[..., :-1])  # (b, L, W)
    first = j0.astype(np.int64) + (pad - K)  # (b, L) first sub-channel in the padded row
    if b > 1:
        first += np.arange(b)[:, None] * Fp
    flat = first[..., None] + np.arange(2 * K + 1)
    tau = np.bincount(flat.ravel(), weights=tau_bin.ravel(), minlength=b * Fp)
    tau = tau.reshape(b, Fp)[:, pad : pad + n_sub * C]  # -tau, (b, n_sub C)
    np.expm1(tau, out=tau)  # -(1 - exp(-tau))
    if n_sub == 1:
        return amp * np.negative(tau, out=tau)
    if n_sub <= 8:  # a reduction over a short last axis is slow in numpy: add strided slices
        mean = tau[:, 0::n_sub] + tau[:, 1::n_sub]
        for j in range(2, n_sub):
            mean += tau[:, j::n_sub]
    else:
        mean = np.add.reduce(tau.reshape(b, C, n_sub), axis=-1)
    mean *= -1.0 / n_sub  # (b, C) channel mean of 1 - exp(-tau)
    return amp * mean
