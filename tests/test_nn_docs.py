"""Every public module of attnkit.nn documents its own forward: help(module.forward) must not show
torch's nn.Module boilerplate, and says shapes (legend letters), dtypes and what it raises."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest
from torch import nn

import attnkit.nn as aknn

# modules that raise nothing of their own in forward (they hand q and k back, unchanged or via rotate)
RAISE_NOTHING = {"AttentionPositional", "ALiBi"}


def public_modules() -> list[type[nn.Module]]:
    classes = [getattr(aknn, name) for name in aknn.__all__]
    for name in ("attnkit.pretrained.bert", "attnkit.pretrained.llama"):  # the loaders' own modules, if any
        module = importlib.import_module(name)
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == name]
    return [c for c in classes if isinstance(c, type) and issubclass(c, nn.Module)]


def test_the_walk_finds_the_modules():
    names = {c.__name__ for c in public_modules()}
    assert {"MultiHeadAttention", "DecoderLM", "Encoder", "RotaryEmbedding", "LongformerSelfAttention"} <= names


@pytest.mark.parametrize("cls", public_modules(), ids=lambda c: c.__name__)
def test_forward_has_its_own_docstring_with_shapes(cls):
    torch_doc = inspect.getdoc(nn.Module.forward)
    own = cls.__dict__.get("forward")
    assert own is not None and own.__doc__, f"{cls.__name__}.forward is inherited or has no docstring"
    doc = inspect.getdoc(cls.forward)
    assert doc != torch_doc and cls.forward.__module__.startswith("attnkit")
    assert re.search(r"\((B|\.\.\.), [A-Z]", doc), f"{cls.__name__}.forward names no shape like (B, N, E)"
    assert "dtype" in doc, f"{cls.__name__}.forward says nothing about dtypes"
    if cls.__name__ not in RAISE_NOTHING:
        assert "Raises:" in doc, f"{cls.__name__}.forward has no Raises: section"
