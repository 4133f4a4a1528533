"""The PPO-specific maths, as small pure functions over tensors (no models, no I/O).

Shapes: ``B`` sequences in a batch, ``T`` response tokens (right-padded), ``V`` vocabulary.
``mask`` is a ``[B, T]`` float/bool tensor, 1 on real response tokens (up to and including the
end-of-sequence token) and 0 on padding; every statistic here ignores padded positions, because a
padded token was never sampled and must neither earn reward nor move a mean.

The conventions follow the RLHF PPO of Ziegler et al. (2019) / AlpacaFarm, which SALMON trained
with: a per-token KL penalty to the reference, the sequence reward on the last response token,
GAE over the response, whitened advantages, clipped policy and value losses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position: ``logits [B, T, V]``, ``labels [B, T]`` -> ``[B, T]``.

    log_softmax then gather; computed in float32 so bf16 logits do not lose the small
    log-ratio differences the clipped objective depends on.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: ``[B, T, V]`` -> ``[B, T]``.

    H = logsumexp(z) - sum softmax(z) * z, which avoids log(0) for tokens with zero probability.
    """
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - (F.softmax(z, dim=-1) * z).sum(-1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over positions where ``mask`` is 1 (all of them, or along ``dim``); 0 where nothing is unmasked."""
    m = mask.to(x.dtype)
    den = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / den.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over unmasked positions (scalar); Bessel-corrected by default, as whitening uses it."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    n = m.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over unmasked positions; padded positions come back as 0.

    ``shift_mean=False`` only rescales (used for rewards, whose sign carries meaning).
    """
    m = mask.to(x.dtype)
    mean, var = masked_mean(x, m), masked_var(x, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
          clamp_min: float | None = None) -> torch.Tensor:
    """Per-token KL estimate k1 = log pi(a) - log pi_ref(a) for the sampled tokens, ``[B, T]``, 0 on padding.

    Unbiased for KL(pi || pi_ref) under samples from pi, but single tokens can be negative;
    ``clamp_min=0`` clamps them as AlpacaFarm (and so SALMON) did, so the penalty never pays the
    policy for drifting below the reference's probability.
    """
    kl = logprobs - ref_logprobs
    if clamp_min is not None:
        kl = kl.clamp(min=clamp_min)
    return kl * mask.to(kl.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last unmasked position per row (``[B, T]`` -> ``[B]``); 0 for an empty row."""
    t = mask.shape[1]
    positions = torch.arange(t, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(dim=1)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards ``[B, T]``: ``-kl_coef * kl`` everywhere, plus the sequence score ``[B]``
    on the last response token (the reward model grades the whole response, which ends there)."""
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    idx = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, idx] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses.

    ``rewards``, ``values``, ``mask``: ``[B, T]`` -> ``(advantages, returns)``, each ``[B, T]`` and 0
    on padding. delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, where
    V and A past the last real token are 0 (the episode ends there). returns = A + V, the value
    target. With gamma = lam = 1 (SALMON) A_t is the reward-to-go minus V_t.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    t_len = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(t_len)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = a
        # A padded position resets the recursion, so nothing leaks from padding into real tokens.
        next_value = values[:, t] * m[:, t]
        next_adv = a
    return adv, (adv + values) * m


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss (to minimise), masked mean over tokens; all inputs ``[B, T]``.

    loss = mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps))), r = exp(logp - old_logp).
    Returns the loss and detached stats: ``clipfrac`` (share of tokens where the clipped term
    won) and ``approxkl`` (0.5 * mean((logp - old)^2), the drift within the PPO epochs).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, ``0.5 * mean(max((V - R)^2, (V_clip - R)^2))`` with
    ``V_clip = old_V + clip(V - old_V, -c, c)``; all inputs ``[B, T]``.

    Clipping keeps one batch from dragging the value head far from the values the advantages were
    computed with. Returns the loss and ``clipfrac`` (share of tokens where the clipped term won).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l1, l2), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((l2 > l1).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over unmasked tokens: 1 = perfect value head, 0 = no better than a
    constant, negative = worse. NaN when the returns do not vary."""
    var_r = masked_var(returns, mask, unbiased=False)
    if var_r.item() == 0:
        return math.nan
    return float(1.0 - masked_var(returns - values, mask, unbiased=False) / var_r)


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: moves ``value`` so the observed KL tracks ``target``.

    error = clip(kl / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon.
    """

    def __init__(self, init: float, target: float, horizon: int):
        self.value, self.target, self.horizon = float(init), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
