"""SAMI's objective as pure functions (Fränken et al., 2024, "Self-Supervised Alignment with Mutual Information").

For one query x, C constitutions c_1..c_C and the C responses y_1..y_C the model wrote under them
(y_j under c_j), ``logp[i, j]`` is the length-normalised log-likelihood log π(y_j | x, c_i). A model
whose answers carry their constitution puts the mass of every row (which response was written under
c_i?) and of every column (which constitution produced y_j?) on the diagonal. The loss is the mean of
the two cross-entropies with the diagonal as the target: the symmetric InfoNCE bound, so that
``log C - loss`` is a lower bound on the conditional mutual information I(Y; C | X).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sami_loss(logp: torch.Tensor) -> torch.Tensor:
    """½ (row-wise + column-wise cross-entropy with the diagonal as the target) of ``logp [..., C, C]``.

    Leading dimensions are a batch of queries; the result is their mean (a scalar).
    """
    if logp.dim() < 2 or logp.shape[-1] != logp.shape[-2]:
        raise ValueError(f"logp must be [..., C, C]; got shape {tuple(logp.shape)}")
    c = logp.shape[-1]
    flat = logp.reshape(-1, c, c)
    target = torch.arange(c, device=logp.device).repeat(flat.shape[0])
    rows = F.cross_entropy(flat.reshape(-1, c), target)                  # row i: which y is c_i's?
    cols = F.cross_entropy(flat.transpose(1, 2).reshape(-1, c), target)  # column j: which c wrote y_j?
    return 0.5 * (rows + cols)


def mi_lower_bound(logp: torch.Tensor) -> torch.Tensor:
    """InfoNCE lower bound on I(Y; C | X) in nats, per query: ``log C - sami_loss``; shape ``logp.shape[:-2]``."""
    c = logp.shape[-1]
    flat = logp.reshape(-1, c, c)
    per_query = torch.stack([sami_loss(m) for m in flat]) if flat.shape[0] else flat.new_zeros(0)
    return (math.log(c) - per_query).reshape(logp.shape[:-2])
