"""A conditional autoregressive normalising flow on the unit cube [0, 1]^P with a uniform base
(docs/method.md §5): the head of the Spectuner-D1 policy.

Each transform maps one dimension at a time through a monotone piecewise-quadratic CDF
(Muller et al. 2019) whose bins come from an MLP of the context and the dimensions before it;
successive transforms reverse the order. In zuko's vocabulary: `features`, `context`,
`transforms`, `hidden_features`; each transform returns (y, ladj); the flow's public methods are
`log_prob(u, context)` and `sample(context, n)`.

Shape letters: B batch, D context width, P features, S flow samples, M flattened rows (S * B),
K spline bins.

Leaf module: torch only; importing it does nothing.

    flow = Flow(5, 128, transforms=2, hidden_features=(128, 128), bins=16, min_width=1e-3,
                min_density=1e-3)
    u, log_p = flow.sample(context, 50)   # context (B, 128) -> (50, B, 5), (50, B)
"""

import torch
from torch import nn


def _pwq_bins(raw, bins: int, min_width: float, min_density: float) -> tuple:
    """Bin edges x_k, vertex densities v_k and CDF at the edges c_k of a piecewise-quadratic CDF.

    Muller et al. (2019, NIS): the density is linear inside each bin, so the CDF is quadratic.
    raw (M, 2K+1) -> widths (M, K), edges (M, K+1), densities (M, K+1), cdf (M, K+1).
    """
    w = min_width + (1.0 - bins * min_width) * torch.softmax(raw[:, :bins], -1)  # (M, K)
    cw = torch.cumsum(w, -1)[:, :-1]  # (M, K-1)
    edges = torch.cat([torch.zeros_like(w[:, :1]), cw, torch.ones_like(w[:, :1])], -1)
    w = edges[:, 1:] - edges[:, :-1]  # (M, K)
    h = raw[:, bins:]
    v = torch.exp(h - h.max(-1, keepdim=True).values)  # (M, K+1) in (0, 1]
    area = (w * (v[:, 1:] + v[:, :-1]) / 2).sum(-1, keepdim=True)  # (M, 1)
    v = (1.0 - min_density) * v / area + min_density  # integrates to 1, >= min_density
    cdf = torch.cumsum(w * (v[:, 1:] + v[:, :-1]) / 2, -1)[:, :-1]  # (M, K-1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf, torch.ones_like(cdf[:, :1])], -1)
    return w, edges, v, cdf


def _pwq(x, raw, bins: int, min_width: float, min_density: float, inverse: bool) -> tuple:
    """CDF y = F(x) (or x = F^-1(y) if inverse) of one dimension, (M,) -> ((M,), log p(x) (M,))."""
    w, edges, v, cdf = _pwq_bins(raw, bins, min_width, min_density)
    knots = cdf if inverse else edges
    k = (x[:, None] >= knots[:, 1:-1]).sum(-1, keepdim=True)  # (M, 1) bin index 0..K-1
    wk, x0, c0 = w.gather(1, k)[:, 0], edges.gather(1, k)[:, 0], cdf.gather(1, k)[:, 0]
    v0, v1 = v.gather(1, k)[:, 0], v.gather(1, k + 1)[:, 0]
    if inverse:
        # Solve c0 + wk (v0 a + (v1 - v0) a^2 / 2) = x for a in [0, 1]; the root in this form
        # stays accurate when v1 ~ v0 (no cancellation), and the discriminant is >= (wk v1)^2.
        c = (x - c0).clamp_min(0.0)
        b = wk * v0
        disc = (b * b + 2.0 * wk * (v1 - v0) * c).clamp_min(0.0)
        a = (2.0 * c / (b + torch.sqrt(disc))).clamp(0.0, 1.0)
        y = (x0 + a * wk).clamp(0.0, 1.0)
    else:
        a = ((x - x0) / wk).clamp(0.0, 1.0)
        y = (c0 + wk * a * (v0 + a * (v1 - v0) / 2)).clamp(0.0, 1.0)
    return y, torch.log(v0 + a * (v1 - v0))


class AutoregressiveSpline(nn.Module):
    """Autoregressive piecewise-quadratic transform of [0, 1]^P, conditioned on a context.

    Dimension order[i] maps through a monotone CDF whose 2K+1 bin parameters come from an MLP of
    (context, x[order[:i]]). forward (data -> base) and inverse return (y, ladj).
    """

    def __init__(
        self,
        features: int,
        context: int,
        hidden_features: tuple,
        bins: int,
        min_width: float,
        min_density: float,
        order: tuple,
    ):
        super().__init__()
        self.order, self.bins = order, bins
        self.min_width, self.min_density = min_width, min_density
        self.mlps = nn.ModuleList()
        for i in range(features):
            sizes = (context + i,) + tuple(hidden_features)
            layers = []
            for a, b in zip(sizes, sizes[1:]):
                layers += [nn.Linear(a, b), nn.SiLU()]
            last = nn.Linear(sizes[-1], 2 * bins + 1)
            with torch.no_grad():  # near-uniform start, yet gradients reach every layer
                last.weight.mul_(0.01)
                last.bias.zero_()
            self.mlps.append(nn.Sequential(*layers, last))

    def _run(self, x, context, inverse: bool) -> tuple:
        """One pass over the dimensions; the conditioner always reads data-space values."""
        data, ladj = [None] * len(self.order), x.new_zeros(x.shape[0])  # P columns of (M,), (M,)
        out = [None] * len(self.order)
        for i, d in enumerate(self.order):
            prev = [2.0 * (data[e] if inverse else x[:, e])[:, None] - 1.0 for e in self.order[:i]]
            h = torch.cat([context] + prev, -1)  # (M, D + i)
            raw = self.mlps[i](h)  # (M, 2K+1)
            out[d], log_p = _pwq(x[:, d], raw, self.bins, self.min_width, self.min_density, inverse)
            data[d] = out[d] if inverse else x[:, d]
            ladj = ladj - log_p if inverse else ladj + log_p
        return torch.stack(out, -1), ladj  # (M, P), (M,)

    def forward(self, x, context) -> tuple:
        return self._run(x, context, inverse=False)

    def inverse(self, y, context) -> tuple:
        return self._run(y, context, inverse=True)


class Flow(nn.Module):
    """Conditional flow: a list of transforms from data u in [0, 1]^P to a uniform base.

    The base U(0, 1)^P has log-density 0 on the cube, so log p(u) is the summed ladj. Successive
    transforms reverse the variable order so every dimension is conditioned on every other.
    """

    def __init__(
        self,
        features: int,
        context: int,
        transforms: int,
        hidden_features: tuple,
        bins: int,
        min_width: float,
        min_density: float,
    ):
        super().__init__()
        self.features = features
        orders = [tuple(range(features)), tuple(reversed(range(features)))]
        spline = (hidden_features, bins, min_width, min_density)
        self.transforms = nn.ModuleList(
            AutoregressiveSpline(features, context, *spline, orders[t % 2])
            for t in range(transforms)
        )

    def log_prob(self, u, context):
        """log p(u | context): u (..., B, P), context (B, D) -> (..., B)."""
        lead = u.shape[:-1]
        x = u.reshape(-1, self.features)  # (M, P)
        ctx = context.expand(lead + context.shape[-1:]).reshape(x.shape[0], -1)  # (M, D)
        log_p = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ladj = t(x, ctx)
            log_p = log_p + ladj
        return log_p.reshape(lead)

    def sample(self, context, n: int, generator=None) -> tuple:
        """n samples per context by exact inversion: context (B, D) -> (n, B, P), (n, B)."""
        B = context.shape[0]
        z = torch.rand(n * B, self.features, generator=generator, dtype=context.dtype)  # (M, P)
        z = z.to(context.device)
        ctx = context.expand(n, B, context.shape[-1]).reshape(n * B, -1)  # (M, D)
        log_p = z.new_zeros(n * B)
        for t in reversed(self.transforms):
            z, ladj = t.inverse(z, ctx)
            log_p = log_p - ladj
        return z.reshape(n, B, self.features), log_p.reshape(n, B)
