"""HTTP outbounds: route each request (match -> weighted or sticky split -> endpoint),
over pooled mTLS connections to the other agents.

Each request reads the snapshot in force when it starts (the unit of routing in HTTP
is the request, so a canary weight change reaches keep-alive clients at once).
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Hashable
from dataclasses import dataclass

import trio

from meshagent.dataplane.connection import DataplaneContext, connection_boundary, peer_address
from meshagent.dataplane.errors import DataplaneError
from meshagent.dataplane.http_proxy import (
    Forward,
    Relay,
    RelaySession,
    Respond,
    StartFailure,
    serve_http,
)
from meshagent.dataplane.outbound import CONNECT_ATTEMPTS, connect_endpoint
from meshagent.dataplane.plainsocket import PlainSocketStream
from meshagent.dataplane.pool import ConnectionPool, PoolTimeout, Upstream
from meshagent.log import get_logger
from meshagent.protocol.headers import (
    FORWARDED,
    FORWARDED_FOR,
    append_forwarded_for,
    get_all_headers,
    get_header,
    strip_hop_by_hop,
)
from meshagent.protocol.http1 import RequestHead
from meshagent.routing.balance import EndpointBalancer
from meshagent.routing.retry import RetryBudget, RetryRule
from meshagent.routing.split import choose_backend, choose_sticky, subset
from meshagent.routing.table import RequestFacts, RouteTable, rewrite_path
from meshagent.snapshot.model import (
    Backend,
    Endpoint,
    HttpMatch,
    OutboundListener,
    RequestPolicy,
    RouteRule,
    Snapshot,
)

log = get_logger("outbound")

REQUEST_ID = b"x-request-id"
TRACEPARENT = b"traceparent"
# The C relay serves a connection's requests on one choice of the route's (a backend by
# weight, an endpoint by the balancer, from the snapshot in force) for blocks of this
# many requests or this long; at a block's end it goes on while Python makes the next
# choice, and switches to it at the next request: the price of a choice per request in
# Python, spread over many, without a wait. A weight change or a rollback reaches every
# busy connection within about a second.
RELAY_REQUESTS = 128
RELAY_SECONDS = 1.0


class HttpOutbound:
    """Per-listener state: balancer, connection pool and the compiled route table."""

    def __init__(self, listener: OutboundListener, ctx: DataplaneContext) -> None:
        self.listener = listener
        self.ctx = ctx
        self.balancer = EndpointBalancer()
        self.pool = ConnectionPool(self._connect)
        self.budget = RetryBudget()
        # Without a TrafficRoute, every request goes to the outbound's own service.
        self.implicit = RouteRule(route="", backends=(Backend(service=listener.service),))
        self._table: tuple[int, RouteTable] | None = None
        self._rules: dict[RequestPolicy, RetryRule] = {}

    def retry_rule(self, policy: RequestPolicy | None) -> RetryRule | None:
        """The retry rule of a request policy (cached), or None when it never retries."""
        if policy is None or policy.retry_attempts <= 1:
            return None
        rule = self._rules.get(policy)
        if rule is None:
            rule = self._rules[policy] = RetryRule(
                attempts=policy.retry_attempts,
                on_reset="reset" in policy.retry_on,
                on_timeout="timeout" in policy.retry_on,
                statuses=frozenset(policy.retry_statuses),
                idempotent_only=policy.retry_idempotent_only,
                backoff_base_seconds=policy.backoff_base_seconds,
                backoff_max_seconds=policy.backoff_max_seconds,
                budget_percent=policy.budget_percent,
                min_retries_per_second=policy.min_retries_per_second,
            )
        return rule

    async def _connect(self, key: Hashable) -> Upstream:
        assert isinstance(key, Endpoint)
        return await connect_endpoint(key, self.listener, self.ctx.source.current, self.ctx)

    async def connect(
        self, endpoint: Endpoint, fields: dict[str, object], *, wait: bool = True
    ) -> Upstream | DataplaneError:
        """A connection to ``endpoint`` from the pool, or why there is none; the
        balancer hears which (a failure ejects the endpoint for a while). With ``wait``
        False, an endpoint whose connect slots are all taken is a PoolTimeout at once,
        not logged (the request then waits in line in decide)."""
        # In line no longer than a connect of its own could take (TCP, then TLS).
        snapshot = self.ctx.source.current
        seconds = snapshot.connection_seconds(endpoint.service) if wait else 0.0
        try:
            upstream, _ = await self.pool.acquire(endpoint, wait_seconds=seconds)
        except PoolTimeout as exc:  # busy, not failed: the connects in progress tell
            if wait:
                self.ctx.listener_counters(self.listener.name).busy += 1
                log.warning("endpoint busy", endpoint=endpoint.address, error=str(exc), **fields)
            return exc
        except DataplaneError as exc:
            self.balancer.report_failure(endpoint, trio.current_time())
            log.warning("endpoint failed", endpoint=endpoint.address, error=str(exc), **fields)
            return exc
        self.balancer.report_success(endpoint)
        return upstream

    def relay_rule(self, snapshot: Snapshot) -> RouteRule | None:
        """The rule every request takes, when that does not depend on the request (no
        TrafficRoute, or a first rule that matches everything) and it is not sticky;
        else None. Then the C relay may serve the requests (``handle_http_outbound``)."""
        routes = snapshot.routes.get(self.listener.service)
        if routes is None:
            return self.implicit
        if not routes.rules:
            return None
        rule = routes.rules[0]
        if rule.match != HttpMatch() or rule.sticky_cookie or rule.sticky_header:
            return None
        return rule

    def table(self, snapshot: Snapshot) -> RouteTable | None:
        routes = snapshot.routes.get(self.listener.service)
        if routes is None:
            return None
        if self._table is None or self._table[0] != snapshot.version:
            self._table = (snapshot.version, RouteTable(routes))
        return self._table[1]


def _header_map(head: RequestHead) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in head.headers:
        out.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return out


def _cookie(head: RequestHead, name: str) -> str | None:
    wanted = name.encode()
    for value in get_all_headers(head.headers, b"cookie"):
        for part in value.split(b";"):
            key, sep, val = part.strip().partition(b"=")
            if sep and key == wanted:
                return val.decode("latin-1")
    return None


def _mesh_headers(head: RequestHead) -> tuple[tuple[bytes, bytes], ...]:
    headers = strip_hop_by_hop(head.headers, keep_upgrade=head.upgrade is not None)
    if get_header(headers, REQUEST_ID) is None:
        headers = (*headers, (REQUEST_ID, secrets.token_hex(16).encode()))
    if get_header(headers, TRACEPARENT) is None:
        trace = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
        headers = (*headers, (TRACEPARENT, trace.encode()))
    return headers


async def handle_http_outbound(
    sock: socket.socket,
    listener: OutboundListener,
    ctx: DataplaneContext,
    state: HttpOutbound,
) -> None:
    """Serve one HTTP connection from the local app. Never raises; a cancel point."""
    conn = next(ctx.ids)
    client = peer_address(sock)
    client_ip = client.rpartition(":")[0].encode()
    fields: dict[str, object] = {"conn": conn, "listener": listener.name, "client": client}
    start_failure = StartFailure()

    async def decide(head: RequestHead, earlier: tuple[Hashable, ...]) -> Forward | Respond:
        snapshot = ctx.source.current
        if not earlier:
            state.budget.record_request(trio.current_time())
        target = head.target.decode("latin-1")
        facts = RequestFacts.from_target(head.method.decode("latin-1"), target, _header_map(head))
        table = state.table(snapshot)
        rule = table.select(facts) if table is not None else state.implicit
        labels = {"mesh": snapshot.mesh, "destination": listener.service}
        if rule is None:
            return Respond(
                404, f"no route for {facts.method} {facts.path} to {listener.service}", labels
            )
        labels["route"] = rule.route
        response_headers: tuple[tuple[bytes, bytes], ...] = ()
        key: str | None = None
        if rule.sticky_header:
            key = next(iter(facts.headers.get(rule.sticky_header.lower(), ())), None)
        elif rule.sticky_cookie:
            key = _cookie(head, rule.sticky_cookie)
            if key is None:
                key = secrets.token_hex(12)
                cookie = f"{rule.sticky_cookie}={key}; Path=/; HttpOnly; SameSite=Lax"
                response_headers = ((b"Set-Cookie", cookie.encode()),)
        backend = (
            choose_sticky(rule.backends, key.encode())
            if key is not None
            else choose_backend(rule.backends, ctx.rng)
        )
        labels["subset"] = backend.label()
        endpoints = subset(snapshot.endpoints_of(backend.service), backend)
        if not endpoints:
            return Respond(
                503, f"no healthy endpoint for {backend.label()} in mesh {snapshot.mesh}", labels
            )
        tried: list[Endpoint] = []
        last: DataplaneError | None = None
        attempts = CONNECT_ATTEMPTS
        failed = start_failure.take()
        if failed is not None and failed[0] in endpoints:  # start tried one, for this request
            assert isinstance(failed[0], Endpoint)
            tried.append(failed[0])
            last = failed[1]
            attempts -= 1
        # A retry prefers endpoints earlier tries did not use, if there are any.
        avoid = [e for e in endpoints if e in earlier]
        if len(avoid) < len(endpoints):
            tried += avoid
        for _ in range(attempts):
            endpoint = state.balancer.pick(endpoints, trio.current_time(), exclude=tried)
            if endpoint is None:
                break
            tried.append(endpoint)
            upstream = await state.connect(endpoint, fields)
            if isinstance(upstream, DataplaneError):
                last = upstream
                continue
            labels["endpoint"] = endpoint.address
            policy = snapshot.request_policy(backend.service, rule.route)
            headers = append_forwarded_for(_mesh_headers(head), client_ip)
            labels["request_id"] = (get_header(headers, REQUEST_ID) or b"").decode("latin-1")
            return Forward(
                upstream=upstream,
                release=state.pool.releaser(endpoint, upstream),
                target=_rewrite(head.target, facts.path, rule),
                headers=headers,
                response_headers=response_headers,
                labels=labels,
                key=endpoint,
                retry=state.retry_rule(policy),
                budget=state.budget,
                rng=ctx.rng,
                request_seconds=policy.request_seconds if policy else None,
                per_try_seconds=policy.per_try_seconds if policy else None,
            )
        return Respond(
            503, f"{backend.label()}: {len(tried)} endpoint(s) failed or busy, last: {last}", labels
        )

    def relay_choice(snapshot: Snapshot) -> _RelayChoice | None:
        """Where every request of the next block goes, or None (see ``start``)."""
        rule = state.relay_rule(snapshot)
        if rule is None:
            return None
        backend = choose_backend(rule.backends, ctx.rng)
        policy = snapshot.request_policy(backend.service, rule.route)
        if policy is not None and (
            state.retry_rule(policy) is not None
            or policy.request_seconds is not None
            or policy.per_try_seconds is not None
        ):
            return None
        endpoints = subset(snapshot.endpoints_of(backend.service), backend)
        endpoint = state.balancer.pick(endpoints, trio.current_time()) if endpoints else None
        if endpoint is None:
            return None  # decide answers 503, saying why
        labels = {
            "mesh": snapshot.mesh,
            "destination": listener.service,
            "route": rule.route,
            "subset": backend.label(),
            "endpoint": endpoint.address,
        }
        forwarded_for = FORWARDED_FOR + b": " + client_ip + b"\r\n"
        return _RelayChoice(snapshot, endpoint, labels, forwarded_for)

    # A choice that found no idle connection (``start``'s ``connect`` False), kept for
    # the start as the request begins: a request's backend and endpoint are drawn once.
    # Drawn again, they would lean to those with idle connections (a canary's weight
    # bent toward the warm backend, round robin stuck on the endpoint after a cold one).
    kept: _RelayChoice | None = None

    async def start(current: RelaySession | None, *, connect: bool = True) -> RelaySession | None:
        """Where the C relay sends the next block of requests (RELAY_REQUESTS,
        RELAY_SECONDS): what decide would choose for every one of them (``current``
        itself when that is where it goes now: one endpoint, say), or None when that
        depends on the request or needs Python (retries, timeouts, no endpoint, a
        failed connect, which decide then counts as its first try); with ``connect``
        False, None too when the endpoint has no idle pooled connection."""
        nonlocal kept
        start_failure.clear()
        snapshot = ctx.source.current
        choice, kept = kept, None
        if choice is None or choice.snapshot is not snapshot:
            choice = relay_choice(snapshot)
            if choice is None:
                return None
        endpoint, labels, forwarded_for = choice.endpoint, choice.labels, choice.add
        if current is not None and current.same(endpoint, labels, forwarded_for):
            return current  # the relay keeps its upstream: no pool round trip
        if connect:
            # Not in line: when the endpoint is busy the request waits in decide, once.
            upstream = await state.connect(endpoint, fields, wait=False)
            if isinstance(upstream, PoolTimeout):
                return None  # decide waits in line
            if isinstance(upstream, DataplaneError):
                start_failure.record(endpoint, upstream)
                return None  # decide tries the other endpoints
        elif (idle := state.pool.take(endpoint)) is not None:
            upstream = idle
        else:
            kept = choice  # connected once the request begins
            return None
        return RelaySession(
            upstream, state.pool.releaser(endpoint, upstream), labels, forwarded_for, endpoint
        )

    # The C relay makes of a plain request what decide does: _mesh_headers, then
    # append_forwarded_for (when the request has no X-Forwarded-For or Forwarded yet).
    relay = Relay(
        start,
        refuse=(FORWARDED_FOR, FORWARDED),
        gen_ids=True,
        max_requests=RELAY_REQUESTS,
        max_seconds=RELAY_SECONDS,
        on_records=lambda count: state.budget.record_request(trio.current_time(), count),
    )

    with connection_boundary(ctx, log, listener.name, conn=conn, client=client):
        downstream = PlainSocketStream(sock)
        try:
            current = ctx.source.current
            timeouts = current.timeouts
            await serve_http(
                downstream,
                decide,
                idle_seconds=current.idle_seconds(listener.service),
                head_seconds=timeouts.request_head_seconds,
                log_fields=fields,
                stats=ctx.http,
                drain=ctx.drain,
                listener=listener.name,
                pump=ctx.pump,
                relay=relay,
            )
        finally:
            downstream.close()


@dataclass(frozen=True, slots=True)
class _RelayChoice:
    """What an outbound's relay start chose: from ``snapshot``, the endpoint, the
    labels its requests are counted with, and the field line added to each."""

    snapshot: Snapshot
    endpoint: Endpoint
    labels: dict[str, str]
    add: bytes


def _rewrite(target: bytes, path: str, rule: RouteRule) -> bytes:
    if rule.rewrite_prefix is None or rule.match.path_prefix is None:
        return target
    query = target.partition(b"?")[1:]
    new_path = rewrite_path(path, rule.match.path_prefix, rule.rewrite_prefix)
    return new_path.encode("latin-1") + b"".join(query)
