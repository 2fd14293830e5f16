"""The examples in svq's docstrings run, and show what they say."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import svq

MODULES = ["svq"] + [f"svq.{m.name}" for m in pkgutil.iter_modules(svq.__path__) if not m.name.startswith("_")]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see the output above)"


def test_the_package_has_examples() -> None:
    finder = doctest.DocTestFinder()
    examples = sum(len(t.examples) for name in MODULES for t in finder.find(importlib.import_module(name)))
    assert examples >= 10
