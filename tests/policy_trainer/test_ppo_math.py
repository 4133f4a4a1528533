"""PPO maths against hand-worked examples and direct computations (policy_trainer.ppo_math)."""

from __future__ import annotations

import math

import pytest
import torch

from policy_trainer import ppo_math as pm


def test_gae_hand_worked_with_padding():
    # One response of 3 tokens + 1 pad. gamma=0.9, lam=0.5.
    r = torch.tensor([[0.0, 0.0, 1.0, 5.0]])   # the 5.0 sits on padding: must be ignored
    v = torch.tensor([[0.5, 0.4, 0.2, 9.0]])   # so must this value
    m = torch.tensor([[1, 1, 1, 0]])
    adv, ret = pm.gae(r, v, m, gamma=0.9, lam=0.5)
    # t=2: delta = 1 + 0.9*0 - 0.2 = 0.8;            A2 = 0.8
    # t=1: delta = 0 + 0.9*0.2 - 0.4 = -0.22;        A1 = -0.22 + 0.45*0.8 = 0.14
    # t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14;        A0 = -0.14 + 0.45*0.14 = -0.077
    assert adv.tolist()[0] == pytest.approx([-0.077, 0.14, 0.8, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.423, 0.54, 1.0, 0.0])


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    r = torch.tensor([[0.1, -0.2, 2.0], [0.3, 1.0, 0.0]])
    v = torch.tensor([[1.0, 0.5, 0.25], [0.2, 0.7, 3.0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = pm.gae(r, v, m, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([1.9 - 1.0, 1.8 - 0.5, 2.0 - 0.25])
    assert adv[1].tolist() == pytest.approx([1.3 - 0.2, 1.0 - 0.7, 0.0])
    assert ret[0].tolist() == pytest.approx([1.9, 1.8, 2.0])


def test_masked_whiten_hand_worked_and_padding_ignored():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # unmasked 1,2,3,4: mean 2.5, unbiased var 5/3
    w = pm.masked_whiten(x, m)
    s = math.sqrt(5 / 3)
    assert w.flatten().tolist() == pytest.approx([-1.5 / s, -0.5 / s, 0.0, 0.5 / s, 1.5 / s, 0.0], rel=1e-6)
    assert float(pm.masked_mean(w, m)) == pytest.approx(0.0, abs=1e-6)
    kept = pm.masked_whiten(x, m, shift_mean=False)
    assert float(pm.masked_mean(kept, m)) == pytest.approx(2.5)  # rescaled only
    assert float(pm.masked_var(x, m)) == pytest.approx(5 / 3)
    assert float(pm.masked_mean(x, m, dim=1)[1]) == pytest.approx(3.5)


def test_logprobs_entropy_and_kl_against_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[0, 4, 2], [1, 1, 3]])
    ref_logits = torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    lp = pm.logprobs_from_logits(logits, labels)
    ref = pm.logprobs_from_logits(ref_logits, labels)
    for b in range(2):
        for t in range(3):
            p = torch.softmax(logits[b, t], -1)
            q = torch.softmax(ref_logits[b, t], -1)
            assert float(lp[b, t]) == pytest.approx(math.log(p[labels[b, t]]), abs=1e-6)
            assert float(pm.entropy_from_logits(logits)[b, t]) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-5)
            want = math.log(p[labels[b, t]]) - math.log(q[labels[b, t]]) if mask[b, t] else 0.0
            assert float(pm.kl_k1(lp, ref, mask)[b, t]) == pytest.approx(want, abs=1e-5)
    # clamped k1 never goes negative, and is the plain one where that is positive
    raw, clamped = pm.kl_k1(lp, ref, mask), pm.kl_k1(lp, ref, mask, clamp_min=0.0)
    assert (clamped >= 0).all() and (raw < 0).any()
    assert torch.equal(clamped[raw > 0], raw[raw > 0])
    # k1 averages to the true KL(p||q) under samples from p (Monte Carlo, one position)
    p = torch.softmax(logits[0, 0], -1)
    q = torch.softmax(ref_logits[0, 0], -1)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    mc = float((p.log()[samples] - q.log()[samples]).mean())
    assert mc == pytest.approx(float((p * (p / q).log()).sum()), abs=0.01)


def test_token_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.5, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    r = pm.token_rewards(torch.tensor([10.0, -1.0]), kl, mask, kl_coef=0.1)
    assert r.flatten().tolist() == pytest.approx([-0.05, 9.9, 0.0, 0.0, -0.1, -0.1, -0.1, -1.1])
    assert pm.last_token_index(mask).tolist() == [1, 3]


def test_policy_loss_values_and_gradients():
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding: no loss, no gradient
    new = torch.tensor([[math.log(1.5), math.log(0.5), 0.7]], requires_grad=True)
    loss, st = pm.policy_loss(new, old, adv, mask, cliprange=0.2)
    # token 0: ratio 1.5, A=1: max(-1.5, -1.2) = -1.2 (clipped, no gradient)
    # token 1: ratio 0.5, A=-1: max(0.5, 0.8) = 0.8 (clipped, no gradient)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert float(st["clipfrac"]) == pytest.approx(1.0)
    loss.backward()
    assert new.grad[0].tolist() == pytest.approx([0.0, 0.0, 0.0])
    # inside the clip range: d/dlogp of -A * exp(logp - old) / n = -A * ratio / n
    new2 = torch.tensor([[math.log(1.1), math.log(0.9), 0.0]], requires_grad=True)
    loss2, st2 = pm.policy_loss(new2, old, adv, mask, cliprange=0.2)
    assert loss2.item() == pytest.approx((-1.1 + 0.9) / 2)
    assert float(st2["clipfrac"]) == 0.0
    loss2.backward()
    assert new2.grad[0].tolist() == pytest.approx([-1.1 / 2, 0.9 / 2, 0.0])
    # the pessimistic side is never clipped: ratio 0.5 with A>0 keeps its gradient
    new3 = torch.tensor([[math.log(0.5), 0.0, 0.0]], requires_grad=True)
    loss3, _ = pm.policy_loss(new3, old, adv, mask, cliprange=0.2)
    loss3.backward()
    assert new3.grad[0, 0].item() == pytest.approx(-0.5 / 2)


def test_value_loss_values_and_gradients():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0]])
    v = torch.tensor([[0.5, -0.1, 7.0]], requires_grad=True)
    loss, st = pm.value_loss(v, old, ret, mask, cliprange_value=0.2)
    # token 0: unclipped (0.5-1)^2=0.25, clipped (0.2-1)^2=0.64 -> 0.64 (clipped term: no gradient)
    # token 1: unclipped (-0.1-1)^2=1.21, clipped (-0.1-1)^2=1.21 (inside the range) -> 1.21
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert float(st["clipfrac"]) == pytest.approx(0.5)
    loss.backward()
    # d/dv of 0.5 * (v - R)^2 / n = (v - R) / n on the unclipped token
    assert v.grad[0].tolist() == pytest.approx([0.0, -1.1 / 2, 0.0])


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert pm.explained_variance(ret.clone(), ret, mask) == pytest.approx(1.0)
    assert pm.explained_variance(torch.full_like(ret, 2.0), ret, mask) == pytest.approx(0.0, abs=1e-6)
    assert pm.explained_variance(-ret, ret, mask) < 0
    assert math.isnan(pm.explained_variance(ret, torch.ones_like(ret), mask))


def test_padding_never_changes_a_statistic():
    """Whatever sits in padded positions (logits, values, rewards), nothing downstream moves."""
    torch.manual_seed(1)
    b, t = 3, 5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    lp, ref, vals, adv = (torch.randn(b, t) for _ in range(4))
    scores = torch.randn(b)

    def pipeline(lp, ref, vals, adv):
        kl = pm.kl_k1(lp, ref, mask, clamp_min=0.0)
        rew = pm.token_rewards(scores, kl, mask, 0.05)
        a, ret = pm.gae(rew, vals, mask, 1.0, 0.95)
        a = pm.masked_whiten(a, mask)
        pl, _ = pm.policy_loss(lp, ref, a, mask, 0.2)
        vl, _ = pm.value_loss(vals, vals * 0.9, ret, mask, 0.2)
        return torch.stack([pl, vl, pm.masked_mean(kl, mask)]), a, ret

    base = pipeline(lp, ref, vals, adv)
    junk = ~mask.bool()
    noisy = [x.masked_fill(junk, 1e3) for x in (lp, ref, vals, adv)]
    other = pipeline(*noisy)
    for x, y in zip(base, other, strict=True):
        assert torch.allclose(x, y, atol=1e-5)
    assert (base[1][junk] == 0).all() and (base[2][junk] == 0).all()


def test_adaptive_kl_controller_moves_towards_target():
    c = pm.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert c.update(12.0, n_steps=100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped to +0.2
    c = pm.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert c.update(5.4, n_steps=100) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
