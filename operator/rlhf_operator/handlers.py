"""kopf's part: the startup (settings, leadership, the machinery), login, cleanup, and the watches.

No handler decides anything, and kopf handles no watch event: RLHFRun, Job, Pod and PVC events are
taken by the watch caches' tap (cache.tap_watch_streams) before kopf sees them; the tap keeps the
ones that change nothing a pass reads (our own writes coming back among them) and enqueues the run
any other concerns, urgent or not (:func:`urgent`); a periodic resync enqueues every run
(level-triggered: a missed event delays a pass by one resync interval, it never loses one). Only
event-watching handlers are registered, so kopf writes nothing onto runs (no finalizers, no
annotations): re-applying a manifest is a true no-op, and deleting a run never waits for the
operator. Children go with the run through their owner references.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from rlhf_api.names import GROUP, PLURAL, VERSION

from .cache import JOBS, PODS, PVCS
from .controller import Controller
from .observe import job_finished

log = logging.getLogger(__name__)
LIST_PAGE = 100  # objects per page of a watch's initial LIST
# Every resource the operator watches, for readiness: one kopf watch-stream each per watched namespace.
RESOURCES = (
    (GROUP, VERSION, PLURAL),
    ("batch", "v1", JOBS),
    ("", "v1", PODS),
    ("", "v1", PVCS),  # the workspaces: the cache knows whether each exists
)


def _runtime(memo: Any) -> Controller:
    return memo["controller"]


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    runtime = _runtime(memo)
    settings.posting.enabled = False  # the operator posts its own, meaningful events
    settings.watching.server_timeout = 300
    settings.networking.error_backoffs = [1, 2, 5, 10]
    # The initial LIST in pages: kopf's default fetches every object of a kind in one response, and
    # parsing 3,000 full Pods at once was most of a start's memory peak at 1,000 runs (cache.py keeps
    # trimmed copies; each page is dropped once applied).
    settings.watching.chunk_size = LIST_PAGE
    # With explicit namespaces kopf still LISTs and WATCHes all Namespaces (to match patterns) and
    # all CRDs (to follow new versions). The chart's namespace-scoped Role grants neither: each 403
    # was retried through every error backoff (~19 s) before kopf fell back to the plain names and
    # opened any watch. Plain names need no scan, and the CRD is installed before the operator.
    settings.scanning.disabled = bool(runtime.namespaces)
    # A standby replica waits here: kopf starts no watch until startup handlers return.
    await runtime.wait_for_leadership()
    runtime.start()


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf talks to the API server with the same credentials as the operator's client."""
    cfg = _runtime(memo).cluster.api_client.configuration
    keys = cfg.api_key or {}
    scheme, _space, token = (keys.get("authorization") or keys.get("BearerToken") or "").partition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await _runtime(memo).stop()


def run_is_new_or_edited(run: Mapping[str, Any]) -> bool:
    """A run whose status does not answer its spec yet (just created, or edited): its pass starts or
    changes stages, so it goes before the passes that only follow progress (the urgent lane)."""
    observed = (run.get("status") or {}).get("observedGeneration")
    return observed is None or observed != (run.get("metadata") or {}).get("generation")


def urgent(plural: str, body: dict[str, Any]) -> bool:
    """Whether the pass a watch event causes goes in the urgent lane (workqueue.WorkQueue): a new or
    edited run, or a finished Job (a transition: the next stage's Job, or the run's end, must not
    wait behind the passes that only follow Pods and progress)."""
    if plural == PLURAL:
        return run_is_new_or_edited(body)
    return plural == JOBS and job_finished(body)


async def _watched(**_: Any) -> None:
    """Never called: cache.tap_watch_streams takes every event of these resources before kopf's
    handling and enqueues the run itself. A handler is how kopf is told to watch a resource."""


for _group, _version, _plural in RESOURCES:
    kopf.on.event(_group, _version, _plural, id=f"watch-{_plural}")(_watched)
