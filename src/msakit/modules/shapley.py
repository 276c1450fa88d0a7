"""Exact Shapley values of a few players (modalities) and PaSE's modulation coefficients.

Subsets of M players are indexed by BITMASK: subset s holds player m iff bit m of s is set
(with players (text, audio, vision): 0 = {}, 1 = {text}, 2 = {audio}, 3 = {text, audio}, ...,
7 = all). A utility table is a tensor u [..., 2^M] in that order.

Shapley value of player m:
    psi_m = sum over S not holding m of  |S|! (M - |S| - 1)! / M!  * (u(S + m) - u(S)),
a fixed linear map of u (`shapley_matrix`), so values for many utility tables cost one matmul.
Efficiency holds exactly: sum_m psi_m = u(all) - u(empty).

`modulation_coefficients` turns Shapley values into PaSE's gradient multipliers
phi_m = exp(psi_min / psi_m - 1) after clamping psi at 1e-9 and normalising it to sum 1:
the weakest modality gets exactly 1, stronger ones less (down to e^-1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence

import torch


def subset_masks(num_players: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[2^M, M] bool: row s marks the players of subset s (bit m of s)."""
    if num_players < 1:
        raise ValueError(f"need at least one player, got {num_players}")
    s = torch.arange(2**num_players, device=device)
    bits = 2 ** torch.arange(num_players, device=device)
    return (s[:, None] & bits[None, :]) != 0


def subset_players(subset: int, players: Sequence[Hashable]) -> tuple:
    """Players of bitmask `subset`, in the order of `players`."""
    return tuple(p for m, p in enumerate(players) if subset >> m & 1)


def shapley_matrix(num_players: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[M, 2^M] W with psi = W @ u for a utility table u [2^M] (bitmask order)."""
    size = 2**num_players
    weights = torch.zeros(num_players, size, dtype=torch.float64)
    for m in range(num_players):
        bit = 1 << m
        for s in range(size):
            if s & bit:
                continue
            k = bin(s).count("1")
            w = math.factorial(k) * math.factorial(num_players - k - 1) / math.factorial(num_players)
            weights[m, s | bit] += w
            weights[m, s] -= w
    return weights.to(dtype)


def shapley_values(utilities: torch.Tensor, num_players: int | None = None) -> torch.Tensor:
    """Exact Shapley values: utilities [..., 2^M] (bitmask order) -> [..., M]."""
    size = utilities.shape[-1]
    if num_players is None:
        num_players = size.bit_length() - 1
    if size != 2**num_players:
        raise ValueError(f"utilities must have 2^{num_players} = {2**num_players} entries, got {size}")
    weights = shapley_matrix(num_players, torch.float64).to(utilities.device)
    values = utilities.to(torch.float64) @ weights.T
    return values.to(utilities.dtype) if utilities.is_floating_point() else values


def utilities_from_table(
    table: Mapping[frozenset, float], players: Sequence[Hashable]
) -> torch.Tensor:
    """{frozenset(players): utility} -> [2^M] float64 tensor in bitmask order. Every subset,
    the empty one included, must be in the table."""
    values = []
    for s in range(2 ** len(players)):
        key = frozenset(subset_players(s, players))
        if key not in table:
            raise KeyError(f"utility table has no entry for subset {sorted(map(str, key))}")
        values.append(float(table[key]))
    return torch.tensor(values, dtype=torch.float64)


def shapley_from_table(table: Mapping[frozenset, float], players: Sequence[Hashable]) -> dict:
    """{player: Shapley value} from a {frozenset: utility} table."""
    values = shapley_values(utilities_from_table(table, players), len(players))
    return {p: float(v) for p, v in zip(players, values, strict=True)}


def shapley_from_function(
    utility: Callable[[torch.Tensor], torch.Tensor], num_players: int
) -> torch.Tensor:
    """Batched utility function: `utility(masks [2^M, M] bool) -> [2^M]`, called ONCE with every
    subset; returns the Shapley values [M]."""
    masks = subset_masks(num_players)
    return shapley_values(utility(masks), num_players)


def modulation_coefficients(psi: torch.Tensor, floor: float = 1e-9) -> torch.Tensor:
    """PaSE's gradient multipliers: psi [..., M] -> phi [..., M] in [e^-1, 1].

    psi is clamped at `floor` (a modality that hurts counts as contributing almost nothing),
    normalised to sum 1, and phi_m = exp(psi_min / psi_m - 1): 1 for the weakest modality,
    smaller for the dominant ones."""
    clamped = psi.clamp_min(floor)
    share = clamped / clamped.sum(dim=-1, keepdim=True)
    return torch.exp(share.amin(dim=-1, keepdim=True) / share - 1.0)
