"""data_synth test settings."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny model's ops are microseconds long: with the CPU shared, a second intra-op thread only
    spins and waits (measured 10x slower generation on a loaded 2-core box), so these tests use one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
