"""Sequential: chain plain modules around exactly one quantizer."""

from __future__ import annotations

from torch import nn


def _quantizer_classes() -> tuple[type, ...]:
    from . import QUANTIZERS  # the package imports this module first

    return QUANTIZERS


class Sequential(nn.Module):
    """Run modules in order; the one quantizer among them receives the forward keyword arguments, and the
    result is ``(x, *rest)``: the final tensor followed by the quantizer's other outputs.

    Example::

        >>> model = Sequential(nn.Linear(8, 16), VectorQuantize(dim=16, codebook_size=32), nn.Linear(16, 8))
        >>> out, indices, loss = model(torch.randn(2, 10, 8))
    """

    def __init__(self, *modules: nn.Module):
        super().__init__()
        quantizers = _quantizer_classes()
        count = sum(isinstance(m, quantizers) for m in modules)
        if count != 1:
            raise ValueError(f"Sequential must contain exactly one quantizer, got {count}")
        self.fns = nn.ModuleList(modules)

    def forward(self, x, **kwargs):
        quantizers = _quantizer_classes()
        rest = ()
        for fn in self.fns:
            if isinstance(fn, quantizers):
                x, *rest = fn(x, **kwargs)
            else:
                x = fn(x)
        return (x, *rest)
