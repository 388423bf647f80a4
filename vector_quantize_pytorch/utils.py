"""Sequential: chain plain modules around exactly one quantizer."""

from __future__ import annotations

from torch import nn

from .quantizers import QUANTIZERS


class Sequential(nn.Module):
    """Run modules in order; the one quantizer among them receives the forward keyword arguments, and the
    result is ``(x, *rest)``: the final tensor followed by the quantizer's other outputs.

    Example::

        >>> model = Sequential(nn.Linear(8, 16), VectorQuantize(dim=16, codebook_size=32), nn.Linear(16, 8))
        >>> out, indices, loss = model(torch.randn(2, 10, 8))
    """

    def __init__(self, *modules: nn.Module):
        super().__init__()
        count = sum(isinstance(m, QUANTIZERS) for m in modules)
        if count != 1:
            raise ValueError(f"Sequential must contain exactly one quantizer, got {count}")
        self.fns = nn.ModuleList(modules)

    def forward(self, x, **kwargs):
        rest = ()
        for fn in self.fns:
            if isinstance(fn, QUANTIZERS):
                x, *rest = fn(x, **kwargs)
            else:
                x = fn(x)
        return (x, *rest)
