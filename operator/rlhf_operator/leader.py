"""Leader election on a coordination.k8s.io Lease, so two replicas never both act.

kopf's own peering freezes every operator when two share a priority (as replicas of one Deployment
do), so it cannot give one-active-one-standby; a Lease can. The protocol is client-go's: the holder
renews ``renewTime`` every ``duration/3``; anyone may take a Lease whose renewTime is older than its
``leaseDurationSeconds``; every write carries the resourceVersion it read, so of two contenders
exactly one wins. A holder that cannot renew within its renew deadline (two thirds of the duration,
as client-go's 10 s of 15 s) clears ``leading`` and stays a candidate: it stops acting before anyone
else may take the Lease, and takes it back when it can reach the API server again (at once if no
one else took it: a holder with the same identity renews its own Lease). It does not exit: an API
server outage longer than the Lease used to restart the operator, and crash-loop it while the outage
lasted. A restarted pod with the same identity (its name) takes its Lease back at once.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

from kubernetes import client
from kubernetes.client.rest import ApiException

from rlhf_api.timestamps import format_micro_timestamp, parse_timestamp

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


class LeaseElector:
    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        name: str,
        identity: str,
        duration: float = 15.0,
    ) -> None:
        self.api = client.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.duration = duration
        # Stop acting this long after the last renewal began: before the Lease expires for others,
        # so that the old leader has stopped before a new one can acquire, even with some clock skew.
        self.renew_deadline = duration * 2 / 3
        # Per request, so that a renewal against an API server that accepts but never answers
        # returns to the loop (which then gives the leadership up) instead of hanging in it.
        self._timeout = max(1.0, duration / 5)
        self.leading = threading.Event()
        self._stop = threading.Event()
        self._last_renew = 0.0

    def acting(self) -> bool:
        """Whether this replica may act now: it leads, and its last renewal began within the renew
        deadline. Judged at the moment of asking, so a renewal stuck on an unreachable API server
        cannot stretch the leadership past the deadline."""
        return self.leading.is_set() and time.monotonic() - self._last_renew <= self.renew_deadline

    def start(self) -> None:
        threading.Thread(target=self._loop, name="leader-election", daemon=True).start()

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if release and self.leading.is_set():
            try:  # hand over at once instead of making the next leader wait out the lease
                lease = self.api.read_namespaced_lease(self.name, self.namespace, _request_timeout=self._timeout)
                spec = lease.spec
                if spec is not None and spec.holder_identity == self.identity:
                    spec.holder_identity = None
                    spec.renew_time = None
                    self.api.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=self._timeout)
            except ApiException as exc:
                log.warning("could not release lease: %s", exc.reason)

    def _loop(self) -> None:
        while not self._stop.is_set():
            # Taken before the request: the renewTime written is no earlier than this, so the
            # deadline is counted from no later than what other replicas see.
            attempt = time.monotonic()
            try:
                won = self._try_acquire_or_renew()
            except Exception as exc:
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
                won = False
            if won and time.monotonic() - attempt > self.renew_deadline:
                won = False  # a write that took this long may already be too late to count on
            if won:
                self._last_renew = attempt
                if not self.leading.is_set():
                    log.info("became leader (%s)", self.identity)
                    self.leading.set()
            elif self.leading.is_set() and time.monotonic() - self._last_renew > self.renew_deadline:
                log.error("lost the lease %s/%s: stopped acting; trying to take it back", self.namespace, self.name)
                self.leading.clear()
            self._stop.wait(self.duration / 3 if self.leading.is_set() else min(2.0, self.duration / 3))

    def _spec(self, acquire: datetime | None, transitions: int) -> client.V1LeaseSpec:
        now = _now()
        return client.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=max(1, round(self.duration)),
            acquire_time=format_micro_timestamp(acquire or now),
            renew_time=format_micro_timestamp(now),
            lease_transitions=transitions,
        )

    def _try_acquire_or_renew(self) -> bool:
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace, _request_timeout=self._timeout)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace), spec=self._spec(None, 0)
            )
            try:
                self.api.create_namespaced_lease(self.namespace, body, _request_timeout=self._timeout)
                return True
            except ApiException as err:
                if err.status == 409:
                    return False
                raise
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity
        renewed = spec.renew_time
        if isinstance(renewed, str):
            renewed = parse_timestamp(renewed)
        duration = spec.lease_duration_seconds or self.duration
        expired = renewed is None or (_now() - renewed).total_seconds() > duration
        if holder and holder != self.identity and not expired:
            return False
        transitions = (spec.lease_transitions or 0) + (0 if holder == self.identity else 1)
        acquired = spec.acquire_time if holder == self.identity else None
        if isinstance(acquired, str):
            acquired = parse_timestamp(acquired)
        lease.spec = self._spec(acquired, transitions)
        try:  # carries metadata.resourceVersion: a concurrent winner makes this a Conflict
            self.api.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=self._timeout)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True
