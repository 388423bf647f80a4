"""Every constructor argument of every public class is described in that class's docstring.

``help(VectorQuantize)`` is where a user looks up an argument: each argument's name must appear in the class
docstring (own docstring, not inherited), as a word. The check is by name only; what the entry says (what the
argument does, its default and allowed values) is for review.
"""

from __future__ import annotations

import inspect
import re

import pytest

import vector_quantize_pytorch

PUBLIC_CLASSES = sorted(
    {
        obj
        for name in getattr(vector_quantize_pytorch, "__all__", dir(vector_quantize_pytorch))
        if not name.startswith("_") and inspect.isclass(obj := getattr(vector_quantize_pytorch, name))
    },
    key=lambda cls: cls.__name__,
)


def constructor_arguments(cls: type) -> list[str]:
    """Names of the arguments of ``cls(...)``, without ``self``, ``*args`` and ``**kwargs``."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # no introspectable signature
        return []
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [name for name, parameter in signature.parameters.items() if parameter.kind not in variadic]


def undocumented_arguments(cls: type) -> list[str]:
    docstring = cls.__dict__.get("__doc__") or ""
    return [name for name in constructor_arguments(cls) if not re.search(rf"\b{re.escape(name)}\b", docstring)]


def test_there_are_public_classes():
    names = {cls.__name__ for cls in PUBLIC_CLASSES}
    assert {"VectorQuantize", "ResidualVQ", "FSQ", "LFQ"} <= names


def test_finds_a_missing_argument():
    class Documented:
        """Args:
        alpha: the first.
        """

        def __init__(self, alpha: int, beta: int = 0, *args, **kwargs):
            pass

    assert undocumented_arguments(Documented) == ["beta"]


@pytest.mark.parametrize("cls", PUBLIC_CLASSES, ids=lambda cls: cls.__name__)
def test_every_constructor_argument_is_in_the_class_docstring(cls):
    missing = undocumented_arguments(cls)
    assert not missing, f"{cls.__name__}: not in its docstring: {', '.join(missing)}"
