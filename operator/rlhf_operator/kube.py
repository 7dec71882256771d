"""The operator's hands: performs the planner's actions on the API server (reads come from cache.py).

Everything goes through the official Kubernetes client with wire-form dicts (``_preload_content``
off), so the planner and builders never see client model classes. Creation is idempotent
(AlreadyExists is success: names are deterministic), and the status is written with the run's
resourceVersion, so a stale writer gets a Conflict instead of overwriting newer status.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

from rlhf_api.names import API_VERSION, GROUP, KIND, MANAGER, PLURAL, VERSION
from rlhf_api.timestamps import format_timestamp

from .actions import Action, CreateJob, DeleteJob, EnsurePVC, PostEvent, SetJobSuspend
from .children import CONTAINER_NAME

log = logging.getLogger(__name__)
COMPONENT = MANAGER  # the reporting component of the operator's events
LOG_TAIL_LINES = 200  # of a running stage's log, read for its newest progress line
LOG_TIMEOUT = (5.0, 10.0)  # connect, read: a node that does not answer must not hold a worker long
REQUEST_TIMEOUT = (5.0, 30.0)  # connect, read: every other call (the client's default is to wait for ever)
DEFAULT_QPS, DEFAULT_BURST = 50.0, 100


class TokenBucket:
    """client-go's client-side rate limit: ``burst`` requests at once, then ``qps`` per second.

    Why: the operator must not be the client that floods its API server (a resync, a restart
    adopting 1,000 runs, a burst of transitions). A caller over the limit waits its turn; nothing is
    refused. Thread-safe: the reconcile workers call from their own threads.
    """

    def __init__(self, qps: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if qps <= 0 or burst < 1:
            raise ValueError("qps must be > 0 and burst >= 1")
        self.qps, self.burst, self._clock = qps, burst, clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take a token; returns how long to wait before using it (0: at once)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.qps)
            self._at = now
            self._tokens -= 1  # may go negative: the debt is what later callers wait for
            return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def wait(self) -> None:
        delay = self.reserve()
        if delay > 0:
            time.sleep(delay)


def request_name(method: str, url: str) -> str:
    """``PUT rlhfruns/status``, ``POST jobs``, ``GET pods/log``: what a request did, for counting."""
    parts = urllib.parse.urlsplit(url).path.strip("/").split("/")
    if "namespaces" in parts and len(parts) > parts.index("namespaces") + 2:
        parts = parts[parts.index("namespaces") + 2 :]  # resource [name [subresource]]
    else:
        parts = parts[-1:]
    resource = parts[0] + (f"/{parts[2]}" if len(parts) > 2 else "")
    return f"{method.upper()} {resource}"


def limit_client(
    api_client: client.ApiClient,
    qps: float = DEFAULT_QPS,
    burst: int = DEFAULT_BURST,
    count: Callable[[str], None] | None = None,
) -> client.ApiClient:
    """Every request of ``api_client`` goes through a token bucket and has a timeout (and is counted
    by :func:`request_name` when ``count`` is given).

    Wrapped at the REST layer, the one place all generated API methods pass, so no call can forget
    either (a call that names its own ``_request_timeout``, like the log read's, keeps it).
    """
    bucket = TokenBucket(qps, burst)
    rest = api_client.rest_client
    request = rest.request

    def limited(method: str, url: str, **kwargs: Any) -> Any:  # the client passes all else by keyword
        if count is not None:
            count(request_name(method, url))
        bucket.wait()
        kwargs["_request_timeout"] = kwargs.get("_request_timeout") or REQUEST_TIMEOUT
        return request(method, url, **kwargs)

    rest.request = limited  # type: ignore[method-assign,assignment]
    return api_client


def _json(resp: Any) -> dict[str, Any]:
    return json.loads(resp.data)


def _body(manifest: Mapping[str, Any]) -> Any:
    """A plain-dict manifest as a request body: the client sends dicts as they are (its hints name only models)."""
    return manifest


class NotLeading(RuntimeError):
    """A write refused because this replica may not act now (it lost the Lease during the pass)."""


class Cluster:
    """A thin, synchronous facade over the client for one operator process (thread-safe for reads)."""

    def __init__(
        self, api_client: client.ApiClient, identity: str = COMPONENT, may_act: Callable[[], bool] | None = None
    ) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.identity = identity
        # The leader's fence, asked before every write: a pass already running in its worker thread
        # when the Lease is lost cannot be cancelled, so its remaining writes are refused here.
        self.may_act = may_act or (lambda: True)

    def _fence(self) -> None:
        if not self.may_act():
            raise NotLeading("not the leader: no writes")

    # --- reads (the watch caches hold the rest: cache.py) ------------------------------------
    def pod_log_tail(self, namespace: str, pod: str, lines: int = LOG_TAIL_LINES) -> str | None:
        """The last lines of a pod's stage container log (``get pods/log``), or None when it cannot
        be read: no right (403), pod gone (404), container not started (400), node unreachable
        (500, timeout). Never raises for those: live progress is best effort and simply stays as it
        was."""
        try:
            resp: Any = self.core.read_namespaced_pod_log(  # typed str; raw with _preload_content off
                pod,
                namespace,
                container=CONTAINER_NAME,
                tail_lines=lines,
                _preload_content=False,
                _request_timeout=LOG_TIMEOUT,
            )
            return bytes(resp.data).decode("utf-8", errors="replace")
        except ApiException as exc:
            log.debug("%s/%s: cannot read the log for progress: %s %s", namespace, pod, exc.status, exc.reason)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            log.debug("%s/%s: cannot read the log for progress: %s", namespace, pod, exc)
        return None

    # --- writes ------------------------------------------------------------------------------
    def perform(self, run: dict[str, Any], action: Action) -> dict[str, Any] | None:
        """Carry out one action; returns the Job a CreateJob created (None when it already existed)."""
        self._fence()
        namespace = run["metadata"]["namespace"]
        if isinstance(action, EnsurePVC):
            self._create(lambda: self.core.create_namespaced_persistent_volume_claim(namespace, _body(action.manifest)))
        elif isinstance(action, CreateJob):
            service = action.service
            if service is not None:
                self._create(lambda: self.core.create_namespaced_service(namespace, _body(service)))
            created = self._create(
                lambda: self.batch.create_namespaced_job(namespace, _body(action.job), _preload_content=False)
            )
            return _json(created) if created is not None else None
        elif isinstance(action, SetJobSuspend):
            self.batch.patch_namespaced_job(action.name, namespace, {"spec": {"suspend": action.suspend}})
        elif isinstance(action, DeleteJob):
            try:
                propagation = "Foreground" if action.wait_for_pods else "Background"
                self.batch.delete_namespaced_job(action.name, namespace, propagation_policy=propagation)
            except ApiException as exc:
                if exc.status != 404:
                    raise
        elif isinstance(action, PostEvent):
            self.post_event(run, action)
        else:  # pragma: no cover - the Action union is closed
            raise TypeError(action)
        return None

    def _create(self, call: Any) -> Any:
        try:
            return call()
        except ApiException as exc:
            if exc.status != 409:  # AlreadyExists: made by an earlier pass (or a previous operator)
                raise
        return None

    def post_event(self, run: dict[str, Any], event: PostEvent) -> None:
        meta = run["metadata"]
        now = format_timestamp()
        body = {
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.identity,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], _body(body))
        except ApiException as exc:  # events are best effort: never fail a reconcile over one
            log.warning("could not post event %s on %s: %s", event.reason, meta["name"], exc.reason)

    def write_status(self, run: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        """Replace the status subresource, guarded by the resourceVersion the plan was made from;
        returns the run as written."""
        self._fence()
        meta = run["metadata"]
        body = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "resourceVersion": meta["resourceVersion"],
            },
            "spec": run.get("spec") or {},
            "status": status,
        }
        return _json(
            self.custom.replace_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], body, _preload_content=False
            )
        )
