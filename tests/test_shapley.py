"""Exact Shapley values (axioms, a hand-computed game), PaSE's coefficients, log-domain Sinkhorn."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from msakit.modules.shapley import (
    modulation_coefficients,
    shapley_from_function,
    shapley_from_table,
    shapley_values,
    subset_masks,
    subset_players,
    utilities_from_table,
)
from msakit.modules.sinkhorn import sinkhorn

torch.set_num_threads(1)

PLAYERS = ("a", "b", "c")


def table_of(fn, players=PLAYERS) -> dict:
    return {frozenset(s): fn(frozenset(s)) for r in range(len(players) + 1)
            for s in itertools.combinations(players, r)}


def test_subset_masks_follow_the_bitmask_order():
    masks = subset_masks(3)
    assert masks.shape == (8, 3) and masks.dtype == torch.bool
    assert masks[0].tolist() == [False, False, False]
    assert masks[1].tolist() == [True, False, False]
    assert masks[6].tolist() == [False, True, True]
    assert masks[7].all()
    assert subset_players(5, ("text", "audio", "vision")) == ("text", "vision")


def test_hand_computed_three_player_game():
    # u: {} 0, a 10, b 20, c 30, ab 40, ac 50, bc 60, abc 90.
    # a: 10/3 + 20/6 + 20/6 + 30/3 = 20;  b: 20/3 + 30/6 + 30/6 + 40/3 = 30;  c: 30/3 + 40/6 + 40/6 + 50/3 = 40
    values = {"": 0, "a": 10, "b": 20, "c": 30, "ab": 40, "ac": 50, "bc": 60, "abc": 90}
    table = table_of(lambda s: values["".join(sorted(s))])
    psi = shapley_from_table(table, PLAYERS)
    assert psi == pytest.approx({"a": 20.0, "b": 30.0, "c": 40.0})


def test_efficiency_symmetry_and_null_player():
    rng = np.random.default_rng(0)
    u = torch.tensor(rng.normal(size=8))
    psi = shapley_values(u, 3)
    assert float(psi.sum()) == pytest.approx(float(u[7] - u[0]))  # efficiency

    # symmetry: a and b are interchangeable in every coalition -> equal values
    base = {frozenset(): 0.0, frozenset("c"): 1.0}

    def symmetric(s):
        return base.get(s, 2.0 * len(s & {"a", "b"}) + 3.0 * ("c" in s) + 0.5 * len(s) ** 2)

    psi = shapley_from_table(table_of(symmetric), PLAYERS)
    assert psi["a"] == pytest.approx(psi["b"])

    # null player: c never changes the utility -> 0
    def without_c(s):
        return {0: 0.0, 1: 1.0, 2: 5.0}[len(s - {"c"})] + (0.7 if "a" in s else 0.0)

    psi = shapley_from_table(table_of(without_c), PLAYERS)
    assert psi["c"] == pytest.approx(0.0, abs=1e-12)
    assert psi["a"] + psi["b"] == pytest.approx(5.7)


def test_additive_game_gives_each_player_its_own_value_and_batches():
    weights = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    psi = shapley_from_function(lambda masks: masks.double() @ weights, 3)
    torch.testing.assert_close(psi, weights)
    batch = torch.randn(4, 5, 8, dtype=torch.float64)  # leading dims are batched
    torch.testing.assert_close(shapley_values(batch)[2, 3], shapley_values(batch[2, 3]))


def test_table_needs_every_subset():
    table = table_of(lambda s: float(len(s)))
    del table[frozenset({"a", "c"})]
    with pytest.raises(KeyError, match="no entry"):
        utilities_from_table(table, PLAYERS)


def test_modulation_coefficients():
    phi = modulation_coefficients(torch.tensor([0.5, 0.25, 0.25]))
    torch.testing.assert_close(phi, torch.tensor([np.exp(-0.5), 1.0, 1.0], dtype=torch.float32))
    phi = modulation_coefficients(torch.tensor([3.0, 0.2, 1.0]))
    assert phi[1] == 1.0  # the weakest modality exactly 1
    assert phi[0] < phi[2] < 1.0  # the dominant one damped most
    assert bool((phi >= np.exp(-1.0)).all())
    # a modality that hurts (negative psi) is clamped: it is the weakest and gets 1
    phi = modulation_coefficients(torch.tensor([0.4, -0.3, 0.1]))
    assert phi[1] == 1.0 and bool(torch.isfinite(phi).all())
    torch.testing.assert_close(modulation_coefficients(torch.full((3,), 0.2)), torch.ones(3))


# ----------------------------------------------------------------------------- Sinkhorn


def test_sinkhorn_marginals_and_gradient():
    torch.manual_seed(0)
    cost = torch.rand(5, 5, requires_grad=True)
    plan = sinkhorn(cost, epsilon=0.05, max_iter=2000)
    torch.testing.assert_close(plan.sum(1), torch.full((5,), 0.2), atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.sum(0), torch.full((5,), 0.2), atol=1e-6, rtol=0)
    (plan * cost).sum().backward()
    assert cost.grad is not None and bool(torch.isfinite(cost.grad).all()) and cost.grad.abs().sum() > 0


def test_sinkhorn_respects_given_marginals_and_batches():
    torch.manual_seed(1)
    cost = torch.rand(3, 4, 6, dtype=torch.float64)
    a = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    b = torch.full((6,), 1 / 6, dtype=torch.float64)
    plans = sinkhorn(cost, 0.1, a.expand(3, 4), b.expand(3, 6), max_iter=5000, tol=1e-10)
    torch.testing.assert_close(plans.sum(-1), a.expand(3, 4), atol=1e-9, rtol=0)
    torch.testing.assert_close(plans.sum(-2), b.expand(3, 6), atol=1e-9, rtol=0)
    single = sinkhorn(cost[1], 0.1, a, b, max_iter=5000, tol=1e-10)
    torch.testing.assert_close(plans[1], single)


def test_sinkhorn_is_finite_where_the_plain_kernel_underflows():
    cost = torch.tensor([[0.0, 40.0], [40.0, 0.0]])  # exp(-40 / 0.05) == 0 in float32
    plan = sinkhorn(cost, epsilon=0.05)
    torch.testing.assert_close(plan, torch.tensor([[0.5, 0.0], [0.0, 0.5]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sinkhorn_agrees_with_pot(seed):
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(seed)
    n, m = 4 + seed, 6
    cost = rng.random((n, m))
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    for eps in (0.05, 0.5):
        expected = ot.bregman.sinkhorn_log(a, b, cost, eps, numItermax=100_000, stopThr=1e-12)
        got = sinkhorn(torch.tensor(cost), eps, max_iter=100_000, tol=1e-12).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-8)
