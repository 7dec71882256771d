"""The operator's watch caches: what a reconcile pass reads, kept current by kopf's watch-streams.

Why: a pass used to GET the run, LIST its Jobs and Pods by label and GET its PVC; at 1,000 runs
that was ~20 passes/s of reads, and a resync LISTed every run every 30 s. Now each watched kind is
LISTed once per (re)connect and then followed by its WATCH, and passes read memory only (client-go's
informers, in small).

Fed from inside kopf's watch-stream (:func:`tap_watch_streams`), not from handlers: every raw event
(the initial listing's items, then ADDED/MODIFIED/DELETED) lands in the cache *before* kopf hands it
to a handler, so the pass a handler enqueues always sees at least the change that caused it, and the
``LISTED`` marker kopf yields after a listing means that kind's cache is complete. The listing's
items are not passed on to kopf: kopf would spawn one worker (holding the whole body) per object
before any handler ran, which is what made a restart with 1,000 finished runs (~9,000 objects) peak
at 567 MiB. Once every stream has listed, the controller enqueues every run that still moves from the
cache (:meth:`WatchCache.unsettled`), which is all the listing's events were for.

Bodies are stored trimmed to the fields the reconciler, :mod:`.observe` and the status writer read
(``trim_*`` below: keep them in step with observe.py; tests/operator/test_cache.py checks that
observing a trimmed object gives the same observation as the full one), and packed as compact JSON
(:class:`Packed`): every read decodes its own copy, which a pass may change freely.

Thread-safety: events arrive on the event loop; passes read from worker threads. Every access holds
one lock, and readers get their own lists, so a pass never sees a dict change under it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple, cast

from rlhf_api.names import (
    CONTROLLER_UID_LABEL,
    GROUP,
    JOB_COMPLETION_INDEX_LABEL,
    KUEUE_QUEUE_LABEL,
    LABEL_MANAGED_BY,
    LABEL_RUN,
    LABEL_STAGE,
    MANAGER,
    PLURAL,
    PROGRESS_ANNOTATION,
)

from .children import CONTAINER_NAME, pvc_name
from .observe import JOB_CONDITIONS
from .workqueue import Backoff

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
RUNS, JOBS, PODS, PVCS = PLURAL, "jobs", "pods", "persistentvolumeclaims"
CACHED = (RUNS, JOBS, PODS, PVCS)
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"

# Why a watch event is not passed on to a handler (``rlhf_watch_events_ignored_total{resource,cause}``):
OWN_WRITE = "own-write"  # the version the cache holds already: our own write (a status, a Job, a PVC) coming back
UNCHANGED = "unchanged"  # a new version, but nothing a pass reads changed (a finalizer, Ready, podIP, ...)
NOT_A_CHILD = "not-a-child"  # a Job or Pod we did not make (no run label or not managed by us: another controller's)


class Change(NamedTuple):
    """What one watch event changed for the passes: the run to pass over, or why none is needed."""

    run: Key | None
    ignored: str | None = None  # the cause, when ``run`` is None


class Packed(NamedTuple):
    """A trimmed body as the cache holds it: its resourceVersion apart, the rest as canonical compact
    JSON. Why not the dict: at 1,000 runs the cache holds ~9,000 objects, and a parsed body takes
    several times its JSON's size in dicts and strings (issue 14: memory at most 150 MiB); a pass
    decodes only its own run's few objects (tens of microseconds). Canonical (sorted keys), so two
    versions differ in what a pass reads exactly when their ``content`` differs."""

    version: str | None
    content: bytes


def pack(body: dict[str, Any]) -> Packed:
    meta = body.get("metadata") or {}
    rest = {**body, "metadata": {k: v for k, v in meta.items() if k != "resourceVersion"}}
    return Packed(meta.get("resourceVersion"), json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())


def unpack(packed: Packed) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(packed.content)
    if packed.version is not None:
        body["metadata"]["resourceVersion"] = packed.version
    return body


def _differs(old: Packed | None, new: Packed) -> bool:
    """Whether two trimmed bodies differ in anything but their resourceVersion (what a pass reads)."""
    return old is None or old.content != new.content


def _pick(source: dict[str, Any] | None, *keys: str) -> dict[str, Any]:
    source = source or {}
    return {k: source[k] for k in keys if source.get(k) is not None}


def _meta(body: dict[str, Any], labels: tuple[str, ...], annotations: tuple[str, ...] = ()) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    out = _pick(meta, "name", "namespace", "uid", "resourceVersion", "creationTimestamp", "deletionTimestamp")
    out["labels"] = _pick(meta.get("labels"), *labels)
    if annotations:
        out["annotations"] = _pick(meta.get("annotations"), *annotations)
    return out


def trim_run(body: dict[str, Any]) -> dict[str, Any]:
    """The run as the reconciler reads it: spec, status and metadata, less what only kubectl reads
    (managedFields; the last-applied annotation, a second copy of the whole spec)."""
    meta = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != LAST_APPLIED}
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    return {"metadata": meta, "spec": body.get("spec") or {}, "status": body.get("status") or {}}


def trim_job(body: dict[str, Any]) -> dict[str, Any]:
    """What :func:`.observe.observe_job` reads of a Job."""
    meta = _meta(body, (LABEL_RUN, LABEL_STAGE, KUEUE_QUEUE_LABEL))
    owners = (body.get("metadata") or {}).get("ownerReferences") or []
    meta["ownerReferences"] = [_pick(o, "uid", "controller") for o in owners]
    status = body.get("status") or {}
    out_status = _pick(status, "active", "succeeded", "failed", "startTime", "completionTime")
    out_status["conditions"] = [
        _pick(c, "type", "status", "reason", "message")
        for c in status.get("conditions") or []
        if c.get("type") in JOB_CONDITIONS  # not SuccessCriteriaMet, FailureTarget: set just before these
    ]
    # completions: a multi-node stage's gang size (its Indexed Job's Pods).
    return {"metadata": meta, "spec": _pick(body.get("spec"), "suspend", "completions"), "status": out_status}


def _container(status: dict[str, Any]) -> dict[str, Any]:
    out = _pick(status, "name")
    state = status.get("state") or {}
    # Only the stage container's termination (its message is the StageResult) and any waiting reason are read.
    keep = ("running", "terminated", "waiting") if status.get("name") == CONTAINER_NAME else ("running", "waiting")
    out["state"] = {k: state[k] for k in keep if k in state}
    if status.get("name") == CONTAINER_NAME and (status.get("lastState") or {}).get("terminated"):
        out["lastState"] = {"terminated": status["lastState"]["terminated"]}
    return out


def trim_pod(body: dict[str, Any]) -> dict[str, Any]:
    """What :mod:`.observe` (results, progress, why it waits) and the log reader read of a Pod."""
    status = body.get("status") or {}
    return {
        # The completion index: a gang's node rank (node 0 speaks for the stage).
        "metadata": _meta(body, (LABEL_RUN, CONTROLLER_UID_LABEL, JOB_COMPLETION_INDEX_LABEL), (PROGRESS_ANNOTATION,)),
        "spec": _pick(body.get("spec"), "nodeName"),
        "status": {
            **_pick(status, "phase"),
            "conditions": [
                _pick(c, "type", "status", "reason", "message")
                for c in status.get("conditions") or []
                if c.get("type") == "PodScheduled"
            ],
            "initContainerStatuses": [_container(c) for c in status.get("initContainerStatuses") or []],
            "containerStatuses": [_container(c) for c in status.get("containerStatuses") or []],
        },
    }


class WatchCache:
    """Runs by key; Jobs and Pods by the run their label names; PVC names (they exist or not)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[Key, Packed] = {}
        self._jobs: dict[Key, dict[str, Packed]] = {}  # (namespace, run) -> uid -> Job
        self._pods: dict[Key, dict[str, Packed]] = {}
        self._pvcs: set[Key] = set()
        self._writing: dict[Key, dict[str, Any]] = {}  # run -> the status a write of ours is sending
        self._creating: set[Key] = set()  # (namespace, name) of the Jobs whose create of ours is under way
        self.expected_streams = 0  # set by tap_watch_streams: one per watched kind and namespace
        self.listed: set[str] = set()  # the streams whose listing has been applied
        self.synced = asyncio.Event()  # created in the loop's thread; set once every stream has listed

    # --- feeding (event loop) -----------------------------------------------------------------
    def apply(self, plural: str, kind: str | None, body: dict[str, Any]) -> Change:
        """One watch event (kind None: an item of a listing), taken in. Returns the run it concerns when
        it changed what a pass reads of the cache (new, gone, or another trimmed body), else why not.

        Why decide here: most watch events under load change nothing a pass reads (a Pod's finalizer
        removed, its Ready condition, our own status write and Job create coming back), and each used
        to cost a pass (issue 14: 8,540 passes for 1,000 runs, most of them writing nothing). kopf's
        own handling decides its causes (create, update, delete) before it calls a handler, too.
        """
        meta = body.get("metadata") or {}
        namespace, name = meta.get("namespace") or "", meta.get("name") or ""
        deleted = kind == "DELETED"
        version = meta.get("resourceVersion")
        with self._lock:
            if plural == RUNS:
                key = (namespace, name)
                old = self._runs.pop(key, None) if deleted else self._runs.get(key)
                sending = self._writing.pop(key, None) if deleted else self._writing.get(key)
                if deleted:
                    return Change(key)
                new = self._runs[key] = pack(trim_run(body))
                if (
                    old is not None
                    and sending is not None
                    and not _differs(pack({**unpack(old), "status": sending}), new)
                ):
                    # Our status write, its event here before its answer reached wrote_run.
                    del self._writing[key]
                    return Change(None, OWN_WRITE)
                return self._change(key, old, new, version)
            run = _our_run(meta)
            if plural == PVCS:
                known = (namespace, name) in self._pvcs
                (self._pvcs.discard if deleted else self._pvcs.add)((namespace, name))
                if known != deleted:  # it exists as the cache knew: a status or metadata update, our own create
                    return Change(None, OWN_WRITE if kind == "ADDED" else UNCHANGED)
                return Change((namespace, run) if run else None, None if run else NOT_A_CHILD)
            if not run or plural not in (JOBS, PODS):
                return Change(None, NOT_A_CHILD)
            index = self._jobs if plural == JOBS else self._pods
            uid = meta.get("uid") or name
            objects = index.get((namespace, run))
            if deleted:
                if objects is not None:
                    objects.pop(uid, None)
                    if not objects:
                        del index[(namespace, run)]
                return Change((namespace, run))
            old = (objects or {}).get(uid)
            new = index.setdefault((namespace, run), {})[uid] = pack((trim_job if plural == JOBS else trim_pod)(body))
            if plural == JOBS and kind == "ADDED" and old is None and (namespace, name) in self._creating:
                # Our Job create, its event here before its answer reached created(): the pass that
                # sent it planned with the Job made (a pass before the Job's first status change
                # would find nothing to do). ~10 % of creates under load (issue 14).
                self._creating.discard((namespace, name))
                return Change(None, OWN_WRITE)
            return self._change((namespace, run), old, new, version)

    @staticmethod
    def _change(key: Key, old: Packed | None, new: Packed, version: str | None) -> Change:
        if old is not None and old.version == version:
            return Change(None, OWN_WRITE)  # what our write returned is cached already (wrote_run, created)
        return Change(key) if _differs(old, new) else Change(None, UNCHANGED)

    def relisted(self, plural: str, namespace: str | None, seen: set[str]) -> list[Key]:
        """After a re-listing (a watch that expired, 410 Gone): drop what it no longer holds (deleted
        while nothing watched). ``seen``: "namespace/name" of runs and PVCs, "namespace/uid" of others.
        Returns the runs concerned, to reconcile them."""
        gone: list[Key] = []
        with self._lock:

            def mine(ns: str) -> bool:
                return namespace is None or ns == namespace

            if plural == RUNS:
                gone = [k for k in self._runs if mine(k[0]) and f"{k[0]}/{k[1]}" not in seen]
                for key in gone:
                    del self._runs[key]
            elif plural == PVCS:
                self._pvcs = {k for k in self._pvcs if not mine(k[0]) or f"{k[0]}/{k[1]}" in seen}
            elif plural in (JOBS, PODS):
                index = self._jobs if plural == JOBS else self._pods
                for key, objects in list(index.items()):
                    if not mine(key[0]):
                        continue
                    for uid in [u for u in objects if f"{key[0]}/{u}" not in seen]:
                        del objects[uid]
                        gone.append(key)
                    if not objects:
                        del index[key]
        return gone

    def stream_listed(self, stream: str) -> None:
        self.listed.add(stream)
        if len(self.listed) >= self.expected_streams:
            self.synced.set()

    # --- the reads a pass makes (any thread) -------------------------------------------------
    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            packed = self._runs.get((namespace, name))
        return None if packed is None else unpack(packed)

    def children(self, namespace: str, run: str, want_pvc: bool) -> tuple[list[dict], list[dict], bool]:
        """The run's Jobs, their Pods, and whether its workspace PVC exists (True when not wanted)."""
        with self._lock:
            jobs = list((self._jobs.get((namespace, run)) or {}).values())
            pods = list((self._pods.get((namespace, run)) or {}).values())
            pvc = not want_pvc or (namespace, pvc_name(run)) in self._pvcs
        return [unpack(j) for j in jobs], [unpack(p) for p in pods], pvc

    def runs(self) -> list[dict[str, Any]]:
        with self._lock:
            runs = list(self._runs.values())
        return [unpack(r) for r in runs]

    # --- what a write sends and returns (any thread) ------------------------------------------
    def writing_status(self, before: dict[str, Any], status: dict[str, Any]) -> None:
        """A status write of ours is about to be sent: its watch event may arrive before its answer
        (the API server sends both; under load either may be read first), and is then known as our
        own by its content (the run as cached, with this status)."""
        meta = before["metadata"]
        with self._lock:
            self._writing[(meta["namespace"], meta["name"])] = status

    def wrote_run(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        """The run as our own status write left it, unless a watch event already brought something
        newer: the next pass (before that write's own event arrives) then plans from what it wrote,
        instead of from the version the write replaced (a Conflict)."""
        meta = before["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._lock:
            self._writing.pop(key, None)
            current = self._runs.get(key)
            if current is not None and current.version == meta.get("resourceVersion"):
                self._runs[key] = pack(trim_run(after))

    def creating(self, plural: str, body: dict[str, Any], sent: bool) -> None:
        """A create of ours is about to be sent (``sent`` False), or its request has ended, answered
        or failed (True). While it is under way a Job's ADDED event is known as our own, like a
        status write's (:meth:`writing_status`); PVCs need not be: their ADDED is known by name."""
        if plural != JOBS:
            return
        meta = body.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        with self._lock:
            (self._creating.discard if sent else self._creating.add)(key)

    def created(self, plural: str, body: dict[str, Any]) -> None:
        """A Job we just created, so that a pass before its ADDED event does not create it again (and
        that event, the same version, is known as our own); a PVC we made sure of, likewise."""
        meta = body.get("metadata") or {}
        run = _our_run(meta)
        if plural == PVCS:
            with self._lock:
                self._pvcs.add((meta.get("namespace") or "", meta.get("name") or ""))
        elif plural == JOBS and run:
            with self._lock:
                self._jobs.setdefault((meta.get("namespace") or "", run), {}).setdefault(
                    meta.get("uid") or meta.get("name") or "", pack(trim_job(body))
                )

    def __len__(self) -> int:
        with self._lock:
            return (
                len(self._runs)
                + sum(map(len, self._jobs.values()))
                + sum(map(len, self._pods.values()))
                + len(self._pvcs)
            )


def _our_run(meta: dict[str, Any]) -> str | None:
    """The run a Job, Pod or PVC belongs to, if this operator made it: the run label alone is not
    enough, anyone can copy it onto their own Job, and a pass would then plan with that Job as a
    stage's (as kopf's ``labels=`` filter kept such objects out before the tap took the events)."""
    labels = meta.get("labels") or {}
    return labels.get(LABEL_RUN) if labels.get(LABEL_MANAGED_BY) == MANAGER else None


def _identity(plural: str, body: dict[str, Any]) -> str:
    meta = body.get("metadata") or {}
    ns = meta.get("namespace") or ""
    if plural in (RUNS, PVCS):
        return f"{ns}/{meta.get('name')}"
    return f"{ns}/{meta.get('uid') or meta.get('name')}"


def tap_watch_streams(
    cache: WatchCache,
    expected: int,
    on_stream_listed: Callable[[str], None],
    on_changed: Callable[[Key, bool], None],
    on_ignored: Callable[[str, str], None] | None = None,
    urgent: Callable[[str, dict[str, Any]], bool] = lambda plural, body: False,
) -> None:
    """Feed ``cache`` from kopf's watch-streams, and report each stream once its listing is applied.

    kopf has no public hook for either: its startup handlers return before its observers have even
    decided what to watch, and handlers see bodies only after kopf's per-object queueing. Each
    (resource, namespace) stream runs ``continuous_watch``: LIST (items with type None), then a
    ``Bookmark.LISTED`` marker, then the WATCH (ADDED/MODIFIED/DELETED) from the listing's
    resourceVersion; a 410 Gone starts it over with a new LIST. kopf looks the function up on its
    module at every (re)connect, which is what makes this wrapper take effect. It is kopf's internal
    API (read in kopf 1.45): if it moves, tests/rbac/test_e2e.py and tests/operator/test_cache.py fail.
    ``on_changed(run, urgent)``: a run one of whose objects changed (a watch event; ``urgent`` as
    ``urgent(plural, body)`` says) or changed or vanished while nothing watched (found by a
    re-listing, never urgent; the first listing is followed by the controller's own enqueueing
    instead). A watch event of a cached kind that changes nothing a pass reads
    (:meth:`WatchCache.apply`) causes nothing; ``on_ignored`` is told its resource and cause.

    No event of a cached kind reaches kopf's handling: it would keep a memory per object it saw for
    the object's lifetime (kopf's ``ResourceMemory``: a copy of the memo, a throttler, daemon and
    index state; ~9,000 objects at 1,000 runs, none of it used by event-only handlers) and run each
    event through a per-object worker task, to end where ``on_changed`` starts: a queued run. The
    cause is decided here, the pass is the work queue's. Other kinds (kopf's own Namespace and CRD
    watches, cluster-wide) are passed on untouched.
    """
    import aiohttp
    from kopf._cogs.clients import errors, watching

    original = watching.continuous_watch
    cache.expected_streams = expected
    backoff = Backoff(base=0.5, cap=30.0)  # per stream, reset by a listing that completes

    async def fed(**kwargs: Any) -> AsyncIterator[Any]:
        resource, namespace = kwargs["resource"], kwargs["namespace"]
        plural = resource.plural if resource.group in ("", "batch", GROUP) else ""
        stream = f"{resource} in {namespace or 'all namespaces'}"
        seen: set[str] = set()
        listing = True
        relisting = stream in cache.listed
        try:
            async for event in original(**kwargs):
                if event is watching.Bookmark.LISTED:
                    listing = False
                    backoff.succeeded((stream, ""))
                    for key in cache.relisted(plural, namespace, seen):
                        on_changed(key, False)
                    seen.clear()
                    cache.stream_listed(stream)  # never undone by a re-listing: readiness must not flap
                    on_stream_listed(stream)
                    yield event
                    continue
                if not isinstance(event, dict) or event.get("type") == "BOOKMARK":
                    yield event
                    continue
                if plural not in CACHED:
                    yield event
                    continue
                body = cast(dict[str, Any], event.get("object") or {})
                change = cache.apply(plural, event.get("type"), body)
                if listing and event.get("type") is None:
                    seen.add(_identity(plural, body))
                    if relisting and change.run is not None:
                        on_changed(change.run, False)
                    continue  # the listing: the controller enqueues from the cache once synced (module doc)
                if change.run is None:
                    if on_ignored is not None:
                        on_ignored(plural, change.ignored or UNCHANGED)
                    continue
                on_changed(change.run, urgent(plural, body))
        except (errors.APIError, aiohttp.ClientError, TimeoutError) as exc:
            # kopf lets a watch request's error (a 503 from an API server still starting after an
            # outage, a 403 before its RBAC cache has loaded) end the stream's task for good: the
            # cache would stop following that kind with no sign but stale passes. Ending the stream
            # instead makes kopf reconnect, which re-lists, which repairs the cache.
            delay = backoff.failed((stream, ""))
            log.warning("watch-stream for %s failed (%s); listing again in %.1fs", stream, exc, delay)
            await asyncio.sleep(delay)

    watching.continuous_watch = fed
