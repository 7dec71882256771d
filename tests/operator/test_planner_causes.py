"""The planner's first step for a stage, ``detect``: which cause wins when its status entry and its Job
say several things at once (the decisions themselves are covered through ``plan`` in test_planner)."""

from __future__ import annotations

import pytest

from rlhf_api.run import StageStatus
from rlhf_operator.observe import JobObservation
from rlhf_operator.planner import Cause, detect


def entry(phase: str = "Pending") -> StageStatus:
    return StageStatus(name="sft", phase=phase)


def job(**kw: bool) -> JobObservation:
    return JobObservation(name="tiny-sft", stage="sft", **kw)


@pytest.mark.parametrize(
    ("st", "observed", "replacing", "later_job", "cause"),
    [
        # What the status records is final: a Job that says otherwise is not read.
        (entry("Succeeded"), job(failed_condition=True), False, False, Cause.SUCCEEDED),
        (entry("Failed"), job(complete=True), False, False, Cause.FAILED),
        (entry("Skipped"), job(complete=True), False, False, Cause.SKIPPED),
        # A retry's deletion wins over the absent Job (which would otherwise mean "succeeded before").
        (entry(), None, True, True, Cause.JOB_BEING_REPLACED),
        (entry(), None, False, True, Cause.SUCCEEDED_BEFORE),
        (entry(), None, False, False, Cause.NO_JOB),
        # A Job being deleted is not read as complete or failed; complete wins over a Failed condition.
        (entry("Running"), job(deleting=True, complete=True), False, False, Cause.JOB_DELETING),
        (entry("Running"), job(complete=True, failed_condition=True), False, False, Cause.JOB_COMPLETE),
        (entry("Running"), job(failed_condition=True, suspended=True), False, False, Cause.JOB_FAILED),
        (entry("Suspended"), job(suspended=True), False, True, Cause.JOB_LIVE),
    ],
)
def test_detect_orders_the_causes(
    st: StageStatus, observed: JobObservation | None, replacing: bool, later_job: bool, cause: Cause
) -> None:
    assert detect(st, observed, replacing, later_job) is cause
