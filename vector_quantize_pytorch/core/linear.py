"""Projections of token features: the ``project_in`` / ``project_out`` maps quantizers put around their codes.

A projection is any module acting on the last axis (``nn.Linear`` by default, ``nn.Identity`` when the sizes
already agree). It is always called as a module, so its forward and backward hooks (the module's own and the
global ones) run, and its backward is autograd's own ``F.linear`` backward: on the CPUs measured, writing the
gradient products in another orientation saved at most a few percent of a training step, on some CPUs it cost
more than it saved, and it needed to read torch's private hook registries to know when it could bypass the call.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["project"]


def project(projection: nn.Module, tokens: Tensor) -> Tensor:
    """``projection(tokens)`` for a projection on the last axis (``nn.Linear``, ``nn.Identity``, any module).

    The projection is called as a module (its hooks run); the function names the operation where the
    quantizers apply their projections.

    Shape:
        - tokens: ``(..., in_features)``
        - output: ``(..., out_features)``

    Example::

        >>> project(nn.Linear(3, 16), torch.randn(4096, 3)).shape
        torch.Size([4096, 16])
    """
    return projection(tokens)
