"""Right-padded batches of token rows: the one padding rule of every forward here over rows of unequal length.

Right padding keeps each row's real tokens at positions 0..n-1 (the positions they have alone), so a
causal model's value at a real token does not depend on the padding; readers take each row's values at
its own length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` as ``(ids, mask)``, both [len(rows), longest row] long tensors: ``pad_id`` and 0 after each
    row's end, its tokens and 1 before. Moved to ``device`` when one is given."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[j, :len(r)] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask
