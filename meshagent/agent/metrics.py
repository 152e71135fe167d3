"""Prometheus metrics of the agent, read at scrape time from the data path's plain
counters: nothing on the hot path touches prometheus_client. Exposition runs in a
worker thread (a large registry would stall the trio loop)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import datetime

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from meshagent.dataplane.connection import LATENCY_BUCKETS_SECONDS, ConnectionCounters, HttpStats
from meshagent.snapshot.model import Snapshot

_exposition_limiter = trio.CapacityLimiter(1)


class AgentCollector(Collector):
    def __init__(
        self,
        counters: Callable[[], Mapping[str, ConnectionCounters]],
        http: Callable[[], HttpStats | None],
        snapshot: Callable[[], Snapshot],
        cert_not_after: Mapping[str, datetime],
        processes: Callable[[], tuple[int, int]] = lambda: (1, 0),
    ) -> None:
        """``processes()``: (processes serving the listeners now, worker restarts so far)."""
        self._processes = processes
        self._counters = counters
        self._http = http
        self._snapshot = snapshot
        self._not_after = cert_not_after

    def collect(
        self,
    ) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        snapshot = self._snapshot()
        mesh = snapshot.mesh
        by_listener = dict(self._counters())
        accepted = CounterMetricFamily(
            "meshagent_connections", "Connections accepted", labels=["mesh", "listener"]
        )
        failed = CounterMetricFamily(
            "meshagent_connections_failed",
            "Connections that ended in an error (refused, handshake, upstream)",
            labels=["mesh", "listener"],
        )
        active = GaugeMetricFamily(
            "meshagent_connections_active", "Connections open now", labels=["mesh", "listener"]
        )
        bytes_total = CounterMetricFamily(
            "meshagent_bytes",
            "Bytes proxied (in: towards the app side of the listener)",
            labels=["mesh", "listener", "direction"],
        )
        reasons = CounterMetricFamily(
            "meshagent_connection_failures",
            "Failed connections by reason (handshake, unauthorized, upstream-connect, ...)",
            labels=["mesh", "listener", "reason"],
        )
        tls = CounterMetricFamily(
            "meshagent_tls_handshake_failures",
            "Failed TLS handshakes by reason (no-certificate, unknown-ca, expired, not-tls, ...)",
            labels=["mesh", "listener", "reason"],
        )
        handshakes = CounterMetricFamily(
            "meshagent_tls_handshakes",
            "Inbound TLS handshakes done, by whether they resumed a session (yes: cheap)",
            labels=["mesh", "listener", "resumed"],
        )
        busy = CounterMetricFamily(
            "meshagent_http_busy",
            "HTTP requests answered 503 (TCP outbounds: client connections closed) because "
            "every connect slot to the endpoint (outbound) or the app (inbound) stayed "
            "taken as long as a connect could take",
            labels=["mesh", "listener"],
        )
        pool_idle = GaugeMetricFamily(
            "meshagent_pool_idle_connections",
            "Idle connections the listener's pool holds for its next requests (HTTP: to "
            "the endpoints or the app; TCP outbound: to other agents)",
            labels=["mesh", "listener"],
        )
        pool_connecting = GaugeMetricFamily(
            "meshagent_pool_connects_in_progress",
            "Connects (TCP and TLS handshake) the listener's pool has under way",
            labels=["mesh", "listener"],
        )
        pool_waiting = GaugeMetricFamily(
            "meshagent_pool_requests_waiting",
            "HTTP requests (TCP outbounds: client connections) waiting in line for a "
            "connection: every connect slot to their endpoint (or the app) is taken",
            labels=["mesh", "listener"],
        )
        plaintext = CounterMetricFamily(
            "meshagent_inbound_plaintext_connections",
            "Inbound connections without TLS (permissive/off): callers that skip the mesh",
            labels=["mesh", "listener"],
        )
        for name, c in sorted(by_listener.items()):
            if name.startswith("inbound:"):
                plaintext.add_metric([mesh, name], c.plaintext)
                handshakes.add_metric([mesh, name, "no"], c.tls_full)
                handshakes.add_metric([mesh, name, "yes"], c.tls_resumed)
            for reason, count in sorted(dict(c.failures).items()):
                reasons.add_metric([mesh, name, reason], count)
            for reason, count in sorted(dict(c.tls_failures).items()):
                tls.add_metric([mesh, name, reason], count)
            busy.add_metric([mesh, name], c.busy)
            if c.pooled:
                pool_idle.add_metric([mesh, name], c.pool_idle)
                pool_connecting.add_metric([mesh, name], c.pool_connecting)
                pool_waiting.add_metric([mesh, name], c.pool_waiting)
            accepted.add_metric([mesh, name], c.accepted)
            failed.add_metric([mesh, name], c.failed)
            active.add_metric([mesh, name], c.active)
            bytes_total.add_metric([mesh, name, "in"], c.bytes_in)
            bytes_total.add_metric([mesh, name, "out"], c.bytes_out)
        yield from (
            accepted, failed, reasons, tls, handshakes, active, bytes_total, plaintext, busy,
            pool_idle, pool_connecting, pool_waiting,
        )
        yield from self._http_metrics(mesh)
        version = GaugeMetricFamily(
            "meshagent_snapshot_version", "Version of the snapshot in force", labels=["mesh"]
        )
        version.add_metric([mesh], snapshot.version)
        yield version
        endpoints = GaugeMetricFamily(
            "meshagent_endpoints", "Healthy endpoints known per service", labels=["mesh", "service"]
        )
        for service, eps in sorted(snapshot.endpoints.items()):
            endpoints.add_metric([mesh, service], len(eps))
        yield endpoints
        expiry = GaugeMetricFamily(
            "meshagent_certificate_expiry_timestamp_seconds",
            "When each certificate this agent presents expires (Unix time)",
            labels=["mesh", "service"],
        )
        for service, end in sorted(self._not_after.items()):
            expiry.add_metric([mesh, service], end.timestamp())
        yield expiry
        serving, restarts = self._processes()
        processes = GaugeMetricFamily(
            "meshagent_processes",
            "Processes serving the listeners now: the agent and its live workers",
            labels=["mesh"],
        )
        processes.add_metric([mesh], serving)
        yield processes
        restarted = CounterMetricFamily(
            "meshagent_worker_restarts",
            "Worker processes restarted after they died (see `worker exited` in the log)",
            labels=["mesh"],
        )
        restarted.add_metric([mesh], restarts)
        yield restarted

    def _http_metrics(self, mesh: str) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        stats = self._http()
        if stats is None:
            return
        requests = CounterMetricFamily(
            "meshagent_http_requests",
            "HTTP requests by destination, route, subset, source and status class",
            labels=["mesh", "destination", "route", "subset", "source", "code_class"],
        )
        for key, count in sorted(dict(stats.requests).items()):
            requests.add_metric([mesh, *key], count)
        yield requests
        latency = HistogramMetricFamily(
            "meshagent_http_request_duration_seconds",
            "Time from a request's head to the end of its response, as seen by this agent",
            labels=["mesh", "destination", "route"],
        )
        for (destination, route), slot in sorted(dict(stats.latency).items()):
            counts = list(slot)
            buckets = [(str(bound), counts[n]) for n, bound in enumerate(LATENCY_BUCKETS_SECONDS)]
            buckets.append(("+Inf", counts[-2]))
            latency.add_metric([mesh, destination, route], buckets, sum_value=counts[-1])
        yield latency


def new_registry(collector: AgentCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


async def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition, generated in a worker thread. A cancel point."""
    return await trio.to_thread.run_sync(generate_latest, registry, limiter=_exposition_limiter)
