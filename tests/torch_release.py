"""The torch release the tests run on, and a mark for tests of features that need a newer one."""

import pytest
import torch

TORCH_RELEASE = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])  # e.g. (2, 13)


def needs_torch(release: tuple[int, int], why: str) -> pytest.MarkDecorator:
    """Skip, saying ``why``, on a torch release older than ``release``."""
    return pytest.mark.skipif(TORCH_RELEASE < release, reason=f"{why} (torch {release[0]}.{release[1]} or later)")
