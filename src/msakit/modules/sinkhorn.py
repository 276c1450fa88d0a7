"""Entropic optimal transport by Sinkhorn iterations in the LOG domain (differentiable).

Solves  min_P <P, C> + epsilon * sum_ij P_ij (log P_ij - 1)  s.t.  P 1 = a,  P^T 1 = b
with dual potentials f, g and P = exp((f_i + g_j - C_ij) / epsilon). Updating the potentials
with logsumexp keeps every quantity finite for small epsilon (the plain kernel exp(-C/eps)
underflows to 0 for eps = 0.05 and costs of a few units), which is why PaSE's spec asks for the
log domain (the release iterates the plain kernel with a +1e-9 fudge).

Shapes: cost [..., n, m] (leading batch dimensions allowed), a [..., n], b [..., m] -> plan
[..., n, m]. The iterations are ordinary autograd ops, so gradients flow into `cost` (and into
a and b); the early stop only shortens the graph.
"""

from __future__ import annotations

import torch


def sinkhorn(
    cost: torch.Tensor,
    epsilon: float = 0.05,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    max_iter: int = 200,
    tol: float = 1e-6,
    check_every: int = 10,
) -> torch.Tensor:
    """Entropic OT plan between marginals `a` and `b` (uniform 1/n, 1/m when None).

    cost [..., n, m]; epsilon > 0 the entropic regularisation; at most `max_iter` iterations,
    stopping early when the L1 error of the row marginals (the column marginals are exact
    after each g-update) falls below `tol` for every problem of the batch; the error is
    checked every `check_every` iterations (the check costs as much as an iteration).
    Returns the plan P [..., n, m] (sums to sum(a) = sum(b)).
    """
    if epsilon <= 0:
        raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")
    if max_iter < 1 or check_every < 1:
        raise ValueError(f"sinkhorn: max_iter and check_every must be >= 1, got {max_iter}, {check_every}")
    n, m = cost.shape[-2], cost.shape[-1]
    batch_shape = cost.shape[:-2]
    if a is None:
        a = cost.new_full((*batch_shape, n), 1.0 / n)
    if b is None:
        b = cost.new_full((*batch_shape, m), 1.0 / m)
    log_a, log_b = torch.log(a), torch.log(b)
    scaled = cost / epsilon  # [..., n, m]
    f = torch.zeros_like(log_a)  # potentials divided by epsilon
    g = torch.zeros_like(log_b)
    for step in range(1, max_iter + 1):
        f = log_a - torch.logsumexp(g.unsqueeze(-2) - scaled, dim=-1)  # rows
        g = log_b - torch.logsumexp(f.unsqueeze(-1) - scaled, dim=-2)  # columns (now exact)
        if step % check_every == 0 or step == max_iter:
            with torch.no_grad():
                rows = torch.exp(f.unsqueeze(-1) + g.unsqueeze(-2) - scaled).sum(-1)
                if float((rows - a).abs().sum(-1).max()) < tol:
                    break
    return torch.exp(f.unsqueeze(-1) + g.unsqueeze(-2) - scaled)
