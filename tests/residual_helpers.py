"""Helpers shared by the residual-stack tests (imported as a plain module: pytest puts tests/ on sys.path)."""

import torch


def fixed_input():
    """A deterministic ``(2, 6, 4)`` input (no RNG): the same numbers in every torch build."""
    return (torch.sin(torch.arange(2 * 6 * 4, dtype=torch.float32) * 0.7) * 1.3).reshape(2, 6, 4)


def kept_layers(indices):
    """Number of leading layers with an index, per token: ``(..., q)`` -> ``(...)``; checks -1 is a suffix."""
    kept = (indices >= 0).sum(-1)
    positions = torch.arange(indices.shape[-1])
    assert torch.equal(indices >= 0, positions < kept.unsqueeze(-1))
    return kept
