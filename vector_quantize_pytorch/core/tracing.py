"""Whether the code runs eagerly or is being captured into a graph (compiled, exported, scripted, traced).

Every export check and every "eager or captured" check of the package goes through these two functions, so the
torch versions where a query does not exist yet are handled once: ``torch.compiler.is_exporting`` arrived after
torch 2.3 (whose ``torch.export`` runs under dynamo, so ``torch.compiler.is_compiling()`` is true while exporting
there). Checks that only ask whether dynamo is tracing call ``torch.compiler.is_compiling()``, which every
supported torch has.
"""

from __future__ import annotations

import torch


def is_exporting() -> bool:
    """True while ``torch.export`` traces the code (always False before torch has ``torch.compiler.is_exporting``)."""
    query = getattr(torch.compiler, "is_exporting", None)
    return query is not None and query()


def is_capturing() -> bool:
    """True while the code is compiled, exported, scripted or traced rather than run eagerly."""
    return torch.compiler.is_compiling() or is_exporting() or torch.jit.is_scripting() or torch.jit.is_tracing()


__all__ = ["is_capturing", "is_exporting"]
