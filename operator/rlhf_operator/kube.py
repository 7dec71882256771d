"""The operator's hands: performs the planner's actions on the API server (reads come from cache.py).

Everything goes through the official Kubernetes client with wire-form dicts (``_preload_content``
off), so the planner and builders never see client model classes. Creation is idempotent
(AlreadyExists is success: names are deterministic), and the status is written with the run's
resourceVersion, so a stale writer gets a Conflict instead of overwriting newer status.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
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

    def _refill(self) -> None:
        """The tokens earned since the last take, up to the burst (called holding the lock)."""
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.qps)
        self._at = now

    def reserve(self) -> float:
        """Take a token; returns how long to wait before using it (0: at once)."""
        with self._lock:
            self._refill()
            self._tokens -= 1  # may go negative: the debt is what later callers wait for
            return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def wait(self) -> float:
        """Take a token, sleeping until it may be used; returns the seconds slept."""
        delay = self.reserve()
        if delay > 0:
            time.sleep(delay)
        return delay

    def take_spare(self) -> bool:
        """Take a token only if the bucket would still hold half its burst after: never waits, never
        goes into debt. Why: requests nothing waits on (events, progress log reads) must not queue
        ahead of the writes that move runs on (a Job, a status) when the operator is at its limit
        (issue 14: at 10 transitions/s it sent 50 requests/s, its limit, for most of a run; a third
        of them events).
        The half burst kept is headroom for those writes; what is left over is the spare."""
        with self._lock:
            self._refill()
            if self._tokens - 1 < self.burst / 2:
                return False
            self._tokens -= 1
            return True

    def wait_spare(self, max_wait: float | None, sleep: Callable[[float], None] = time.sleep) -> float:
        """Take a spare token (:meth:`take_spare`), trying every 1/qps seconds; returns the seconds
        waited, or raises :class:`Deferred` once ``max_wait`` has passed (None: wait for ever)."""
        waited = 0.0
        while not self.take_spare():
            if max_wait is not None and waited >= max_wait:
                raise Deferred(f"no spare request capacity within {max_wait:g} s")
            sleep(1 / self.qps)
            waited += 1 / self.qps
        return waited


class Deferred(RuntimeError):
    """A low-priority request not sent: the client-side rate limit had no spare capacity."""


_lane = threading.local()  # this thread's priority, read by limit_client's wrapper


@contextlib.contextmanager
def spare_capacity(max_wait: float | None) -> Iterator[None]:
    """Requests made by this thread inside the ``with`` use only the rate limit's spare capacity
    (:meth:`TokenBucket.take_spare`) and raise :class:`Deferred` after ``max_wait`` seconds without it."""
    before = getattr(_lane, "max_wait", _NORMAL)
    _lane.max_wait = max_wait
    try:
        yield
    finally:
        _lane.max_wait = before


_NORMAL = object()


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
    waited: Callable[[str, float], None] | None = None,
) -> client.ApiClient:
    """Every request of ``api_client`` goes through a token bucket and has a timeout (and is counted
    by :func:`request_name` when ``count`` is given; ``waited`` is told each request's priority,
    "normal" or "spare" (:func:`spare_capacity`), and its wait in the bucket).

    Wrapped at the REST layer, the one place all generated API methods pass, so no call can forget
    either (a call that names its own ``_request_timeout``, like the log read's, keeps it).
    """
    bucket = TokenBucket(qps, burst)
    rest = api_client.rest_client
    request = rest.request

    def limited(method: str, url: str, **kwargs: Any) -> Any:  # the client passes all else by keyword
        max_wait = getattr(_lane, "max_wait", _NORMAL)
        if max_wait is _NORMAL:
            delay, priority = bucket.wait(), "normal"
        else:  # raises Deferred: not sent, not counted
            delay, priority = bucket.wait_spare(max_wait), "spare"  # type: ignore[arg-type]
        if count is not None:
            count(request_name(method, url))
        if waited is not None:
            waited(priority, delay)
        kwargs["_request_timeout"] = kwargs.get("_request_timeout") or REQUEST_TIMEOUT
        return request(method, url, **kwargs)

    rest.request = limited  # type: ignore[method-assign,assignment]
    return api_client


def _json(resp: Any) -> dict[str, Any]:
    return json.loads(resp.data)


def _unread(resp: Any) -> None:
    """An answer asked for raw (``_preload_content=False``) and not needed: its body is still read,
    which hands its connection back to the pool. Why raw: the client's model classes cost
    milliseconds of the interpreter the passes share for each answer (issue 14)."""
    resp.data  # noqa: B018 - reading it is the point


def _body(manifest: Mapping[str, Any]) -> Any:
    """A plain-dict manifest as a request body: the client sends dicts as they are (its hints name only models)."""
    return manifest


MAX_QUEUED_EVENTS = 1000  # as client-go's event broadcaster: past that, the oldest are dropped


class EventPoster:
    """Posts the operator's events from a thread of its own, with the rate limit's spare capacity.

    Why: events are best effort and nothing waits on them, yet they were a third of the operator's
    requests. Posted inline, each pass's events held its worker and took tokens ahead of the next
    pass's Job and status writes: at 10 transitions/s the operator sat at its rate limit, or its
    workers were all busy (issue 14). Here a pass only queues them; they go out in order
    when the limit has room, late under load, and past ``limit`` queued the oldest Normal event is
    dropped (counted by ``dropped``) rather than holding memory or requests; a Warning only when
    none but Warnings are queued. Why Warnings last: under load most queued events are progress
    (a stage started, succeeded), and a user who misses one of them loses nothing the status does
    not say, while a Warning (a failure, suspected reward hacking, an invalid spec) is often what they
    look for first (1,000 runs at 10 transitions/s dropped 3,000-4,900 events: docs/benchmarks.md). A
    replica that stops leading drops what it had queued: the new leader's passes post their own.
    """

    def __init__(
        self,
        send: Callable[[str, dict[str, Any]], None],
        may_act: Callable[[], bool] = lambda: True,
        limit: int = MAX_QUEUED_EVENTS,
        dropped: Callable[[], None] | None = None,
    ) -> None:
        self._send, self._may_act, self._dropped = send, may_act, dropped
        self._limit = limit
        self._queue: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def post(self, namespace: str, body: dict[str, Any]) -> None:
        with self._ready:
            if len(self._queue) >= self._limit:
                self._drop_one()
            self._queue.append((namespace, body))
            self._ready.notify()

    def _drop_one(self) -> None:
        """The oldest Normal event, or the oldest of all when only Warnings are queued (lock held)."""
        normal = next((i for i, (_, body) in enumerate(self._queue) if body.get("type") != "Warning"), 0)
        del self._queue[normal]
        if self._dropped is not None:
            self._dropped()

    def pending(self) -> int:
        with self._ready:
            return len(self._queue)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="event-poster", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._stopping:
                    self._ready.wait()
                if self._stopping:
                    return
                namespace, body = self._queue.popleft()
            if not self._may_act():
                continue
            try:
                with spare_capacity(None):
                    self._send(namespace, body)
            except Exception as exc:  # an API server outage (connection refused): drop it, keep posting
                log.warning("could not post event %s: %s", body.get("reason"), exc)


class NotLeading(RuntimeError):
    """A write refused because this replica may not act now (it lost the Lease during the pass)."""


class Cluster:
    """A thin, synchronous facade over the client for one operator process (thread-safe for reads)."""

    def __init__(
        self,
        api_client: client.ApiClient,
        identity: str = COMPONENT,
        may_act: Callable[[], bool] | None = None,
        events: EventPoster | None = None,
    ) -> None:
        """``events``: post events through it (:class:`EventPoster`, built on :meth:`send_event`);
        None posts each at once, from the pass."""
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.identity = identity
        # The leader's fence, asked before every write: a pass already running in its worker thread
        # when the Lease is lost cannot be cancelled, so its remaining writes are refused here.
        self.may_act = may_act or (lambda: True)
        self.events = events

    def _fence(self) -> None:
        if not self.may_act():
            raise NotLeading("not the leader: no writes")

    # --- reads (the watch caches hold the rest: cache.py) ------------------------------------
    def pod_log_tail(self, namespace: str, pod: str, lines: int = LOG_TAIL_LINES) -> str | None:
        """The last lines of a pod's stage container log (``get pods/log``), or None when it cannot
        be read: no right (403), pod gone (404), container not started (400), node unreachable
        (500, timeout), or no spare request capacity. Never raises for those: live progress is best
        effort and simply stays as it was."""
        try:
            # Progress only: skipped, not queued, when the rate limit has no spare capacity (then
            # the last progress stands until the next read is due).
            with spare_capacity(0):
                resp: Any = self.core.read_namespaced_pod_log(  # typed str; raw with _preload_content off
                    pod,
                    namespace,
                    container=CONTAINER_NAME,
                    tail_lines=lines,
                    _preload_content=False,
                    _request_timeout=LOG_TIMEOUT,
                )
            return bytes(resp.data).decode("utf-8", errors="replace")
        except Deferred as exc:
            log.debug("%s/%s: log not read for progress: %s", namespace, pod, exc)
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
            self._create(
                lambda: _unread(
                    self.core.create_namespaced_persistent_volume_claim(
                        namespace, _body(action.manifest), _preload_content=False
                    )
                )
            )
        elif isinstance(action, CreateJob):
            service = action.service
            if service is not None:
                self._create(
                    lambda: _unread(
                        self.core.create_namespaced_service(namespace, _body(service), _preload_content=False)
                    )
                )
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
        if self.events is not None:
            self.events.post(meta["namespace"], body)
        else:
            self.send_event(meta["namespace"], body)

    def send_event(self, namespace: str, body: dict[str, Any]) -> None:
        try:
            _unread(self.core.create_namespaced_event(namespace, _body(body), _preload_content=False))
        except (ApiException, Deferred) as exc:  # events are best effort: never fail a reconcile over one
            log.warning("could not post event %s on %s: %s", body["reason"], body["involvedObject"]["name"], exc)

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
