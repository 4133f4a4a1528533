"""SAMI's loss against a hand-computed 2x2 case, its gradient direction, and the MI bound."""

from __future__ import annotations

import math

import pytest
import torch

from policy_trainer.sami_math import mi_lower_bound, sami_loss


def test_two_by_two_by_hand():
    # logp[i, j] = log p(y_j | x, c_i); rows and columns differ, so a one-sided loss gives another value.
    logp = torch.tensor([[0.0, -1.0], [-3.0, -1.0]])
    rows = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 2  # row 1: -1 vs -3
    cols = (math.log(1 + math.exp(-3)) + math.log(2)) / 2                 # column 2: -1 vs -1
    assert sami_loss(logp).item() == pytest.approx(0.5 * (rows + cols), abs=1e-6)
    assert mi_lower_bound(logp).item() == pytest.approx(math.log(2) - 0.5 * (rows + cols), abs=1e-6)


def test_gradient_descent_raises_the_diagonal():
    torch.manual_seed(0)
    logp = torch.randn(3, 3, requires_grad=True)
    sami_loss(logp).backward()
    diag = torch.eye(3, dtype=torch.bool)
    assert (logp.grad[diag] < 0).all()   # a descent step moves against the gradient: diagonal up
    assert (logp.grad[~diag] > 0).all()  # and every off-diagonal entry down
    with torch.no_grad():
        stepped = logp - 0.1 * logp.grad
    assert sami_loss(stepped) < sami_loss(logp)
    assert mi_lower_bound(stepped) > mi_lower_bound(logp)


def test_batch_is_the_mean_of_queries_and_bound_limits():
    a = torch.tensor([[0.0, -1.0], [-3.0, -1.0]])
    b = torch.tensor([[-2.0, 0.0], [0.0, -0.5]])
    assert sami_loss(torch.stack([a, b])).item() == pytest.approx((sami_loss(a) + sami_loss(b)).item() / 2)
    assert mi_lower_bound(torch.stack([a, b])).shape == (2,)
    # Uninformative responses (every entry equal): no information, the bound is 0; a sharp diagonal -> log C.
    assert mi_lower_bound(torch.zeros(4, 4)).item() == pytest.approx(0.0, abs=1e-6)
    assert mi_lower_bound(torch.eye(4) * 50 - 50).item() == pytest.approx(math.log(4), abs=1e-4)


def test_rejects_a_non_square_matrix():
    with pytest.raises(ValueError, match=r"\[\.\.\., C, C\]"):
        sami_loss(torch.zeros(2, 3))
