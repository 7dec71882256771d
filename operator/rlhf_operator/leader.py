"""Leader election on a coordination.k8s.io Lease, so two replicas never both act.

kopf's own peering freezes every operator when two share a priority (as replicas of one Deployment
do), so it cannot give one-active-one-standby; a Lease can. The protocol is client-go's: the holder
renews ``renewTime`` every ``duration/3``; anyone may take a Lease whose renewTime is older than its
``leaseDurationSeconds``; every write carries the resourceVersion it read, so of two contenders
exactly one wins. A holder that cannot renew within the duration exits the process (``on_lost``)
rather than risk acting beside a new leader. A restarted pod with the same identity (its name)
takes its Lease back at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
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
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.api = client.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.duration = duration
        self.on_lost = on_lost
        self.leading = threading.Event()
        self._stop = threading.Event()
        self._last_renew = 0.0

    def start(self) -> None:
        threading.Thread(target=self._loop, name="leader-election", daemon=True).start()

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if release and self.leading.is_set():
            try:  # hand over at once instead of making the next leader wait out the lease
                lease = self.api.read_namespaced_lease(self.name, self.namespace)
                spec = lease.spec
                if spec is not None and spec.holder_identity == self.identity:
                    spec.holder_identity = None
                    spec.renew_time = None
                    self.api.replace_namespaced_lease(self.name, self.namespace, lease)
            except ApiException as exc:
                log.warning("could not release lease: %s", exc.reason)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                won = self._try_acquire_or_renew()
            except Exception as exc:
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
                won = False
            now = time.monotonic()
            if won:
                self._last_renew = now
                if not self.leading.is_set():
                    log.info("became leader (%s)", self.identity)
                    self.leading.set()
            elif self.leading.is_set() and now - self._last_renew > self.duration:
                log.error("lost the lease %s/%s: stopping", self.namespace, self.name)
                self.leading.clear()
                if self.on_lost:
                    self.on_lost()
                return
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
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace), spec=self._spec(None, 0)
            )
            try:
                self.api.create_namespaced_lease(self.namespace, body)
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
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True
