"""The usage examples in the plan and schedule docstrings run as written."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "layerpipe.plan.graph",
    "layerpipe.plan.layers",
    "layerpipe.plan.partition",
    "layerpipe.plan.planner",
    "layerpipe.plan.retiming",
    "layerpipe.schedule.actions",
    "layerpipe.schedule.builder",
    "layerpipe.schedule.view",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
