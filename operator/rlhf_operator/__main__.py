"""``python -m rlhf_operator run``: the operator process (kopf + leader election + probes + metrics)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from kubernetes import client, config


def _api_client(kubeconfig: str | None) -> client.ApiClient:
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlhf_operator")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator")
    run.add_argument(
        "--namespace",
        action="append",
        default=None,
        dest="namespaces",
        help="watch this namespace; repeat for several (default: all namespaces)",
    )
    run.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    run.add_argument(
        "--identity",
        default=os.environ.get("POD_NAME") or socket.gethostname(),
        help="this replica's name in the leader Lease (default: $POD_NAME or the hostname)",
    )
    run.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "rlhf-system"))
    run.add_argument("--lease-name", default="rlhf-operator")
    run.add_argument("--lease-duration", type=float, default=15.0, help="seconds a leader's Lease lasts unrenewed")
    run.add_argument("--no-leader-election", action="store_true", help="act at once (a single replica only)")
    run.add_argument("--health-host", default="0.0.0.0")
    run.add_argument("--health-port", type=int, default=8080, help="/healthz, /readyz and /metrics (0: any port)")
    run.add_argument("--resync", type=float, default=30.0, help="seconds between full resyncs of all runs")
    run.add_argument("--workers", type=int, default=4, help="runs reconciled concurrently")
    run.add_argument(
        "--progress-interval",
        type=float,
        default=10.0,
        help="seconds between reads of a running stage's log for live progress (0: never read logs)",
    )
    run.add_argument(
        "--api-qps",
        type=float,
        default=50.0,
        help="client-side rate limit: the operator's API requests per second, sustained",
    )
    run.add_argument("--api-burst", type=int, default=100, help="client-side rate limit: requests at once")
    run.add_argument("--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # kopf logs every handled watch event at INFO: one line per Job/Pod update
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # kopf logs in through the same kubeconfig
    import kopf

    from . import handlers  # registers the handlers
    from .cache import WatchCache, tap_watch_streams
    from .controller import Controller
    from .defaults import OperatorDefaults
    from .health import Health, serve
    from .kube import Cluster, EventPoster, limit_client
    from .leader import LeaseElector
    from .metrics import Metrics

    # Two clients: the Lease's renewals must never wait behind the reconcilers' rate limit.
    metrics, health, cache = Metrics(), Health(), WatchCache()
    api_client = limit_client(
        _api_client(args.kubeconfig),
        args.api_qps,
        args.api_burst,
        count=lambda request: metrics.api_requests.labels(request).inc(),
        waited=lambda priority, seconds: metrics.rate_limit_wait.labels(priority).observe(seconds),
    )
    lease_client = _api_client(args.kubeconfig)
    # Ready once kopf streams every watched resource in every watched namespace (one cluster-wide)
    # and the caches hold each stream's listing.
    streams = len(handlers.RESOURCES) * (len(set(args.namespaces)) if args.namespaces else 1)
    health.streams_expected = streams
    controller: Controller | None = None

    def changed(key: tuple[str, str], urgent: bool) -> None:  # the streams open after the controller exists
        if controller is not None:
            controller.queue.add(key, urgent=urgent)

    tap_watch_streams(
        cache,
        streams,
        health.streams.add,
        changed,
        on_ignored=lambda resource, cause: metrics.watch_events_ignored.labels(resource, cause).inc(),
        urgent=handlers.urgent,
    )
    server = serve(health, metrics, args.health_host, args.health_port)
    logging.getLogger(__name__).info("probes and metrics on port %d", server.server_port)
    elector = None
    if not args.no_leader_election:
        elector = LeaseElector(
            lease_client,
            args.lease_namespace,
            args.lease_name,
            args.identity,
            args.lease_duration,
        )
    cluster = Cluster(api_client, args.identity, may_act=elector.acting if elector is not None else None)
    # Events leave the passes: posted from their own thread with spare request capacity only.
    cluster.events = EventPoster(cluster.send_event, cluster.may_act, dropped=metrics.events_dropped.inc)
    cluster.events.start()
    controller = Controller(
        cluster,
        cache,
        metrics,
        health,
        elector,
        args.namespaces,
        args.resync,
        args.workers,
        defaults=OperatorDefaults.from_env(),
        progress_interval=args.progress_interval,
    )
    kopf.run(
        standalone=True,  # one actor is guaranteed by the Lease, not by kopf peering
        clusterwide=not args.namespaces,
        namespaces=args.namespaces or (),
        memo=kopf.Memo(controller=controller),
        # kopf would otherwise derive one from the user name, and the image's uid (65532) has no
        # passwd entry: getpass.getuser() raised and the operator Pod crash-looped (real node tier).
        identity=args.identity,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
