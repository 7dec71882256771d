"""Every stage of the API's method table has a module the entrypoint can run (validate is optional)."""

from __future__ import annotations

import importlib

import pytest

from rlhf_api.methods import STAGE_KINDS
from rlhf_stages.runtime import entrypoint


@pytest.mark.parametrize("stage", sorted(STAGE_KINDS))
def test_stage_module_has_run(stage: str) -> None:
    assert entrypoint.STAGES[stage] == STAGE_KINDS[stage].module
    module = importlib.import_module(STAGE_KINDS[stage].module)
    assert callable(module.run)
