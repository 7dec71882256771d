"""The leader's deadline and fence, without a control plane: a Lease store that can be cut off."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from rlhf_operator.actions import DeleteJob
from rlhf_operator.kube import Cluster, NotLeading
from rlhf_operator.leader import LeaseElector


class FakeLeases:
    """The two Lease calls the elector makes, against one stored Lease; ``down`` fails them as an
    unreachable API server does (the client raises urllib3 errors, not ApiException)."""

    def __init__(self) -> None:
        self.lease: client.V1Lease | None = None
        self.down = False
        self.version = 0

    def _reach(self) -> None:
        if self.down:
            raise ConnectionRefusedError("the API server is down")

    def read_namespaced_lease(self, name: str, namespace: str, **_: Any) -> client.V1Lease:
        self._reach()
        if self.lease is None:
            raise ApiException(status=404)
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, namespace: str, body: client.V1Lease, **_: Any) -> None:
        self._reach()
        self.version += 1
        body.metadata.resource_version = str(self.version)
        self.lease = body

    def replace_namespaced_lease(self, name: str, namespace: str, body: client.V1Lease, **_: Any) -> None:
        self._reach()
        assert self.lease is not None
        if body.metadata.resource_version != self.lease.metadata.resource_version:
            raise ApiException(status=409)
        self.version += 1
        body.metadata.resource_version = str(self.version)
        self.lease = body


def _until(check: Any, timeout: float = 5.0) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, "timed out"
        time.sleep(0.01)
    return time.monotonic() - started


def test_a_cut_off_leader_stops_acting_by_its_renew_deadline_and_leads_again_when_back() -> None:
    elector = LeaseElector(client.ApiClient(), "ns", "lease", "op-a", duration=0.9)
    leases = FakeLeases()
    elector.api = leases  # type: ignore[assignment]
    elector.start()
    try:
        _until(elector.acting)
        leases.down = True
        cut = time.monotonic()
        _until(lambda: not elector.acting())
        # By the renew deadline (0.6 s of 0.9) after the last renewal, which was at most one renew
        # period (0.3 s) before the cut: well before another replica may take the Lease (0.9 s).
        assert time.monotonic() - cut <= elector.renew_deadline + 0.2  # slack for a loaded machine
        _until(lambda: not elector.leading.is_set())  # the loop agrees, and stays a candidate
        leases.down = False
        _until(elector.acting)
        assert leases.lease is not None and leases.lease.spec.holder_identity == "op-a"
        assert leases.lease.spec.lease_transitions == 0  # its own Lease back, not a new holder
    finally:
        elector.stop(release=False)


def test_the_fence_refuses_writes_when_not_leading() -> None:
    """A pass already running when the Lease is lost gets its writes refused, before any request."""
    leading = [True]
    cluster = Cluster(client.ApiClient(), "op-a", may_act=lambda: leading[0])
    run = {"metadata": {"name": "r", "namespace": "ns", "uid": "u", "resourceVersion": "1"}}
    leading[0] = False
    with pytest.raises(NotLeading):
        cluster.perform(run, DeleteJob("r-sft"))
    with pytest.raises(NotLeading):
        cluster.write_status(run, {"phase": "Running"})
