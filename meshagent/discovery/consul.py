"""ConsulClient: the one small adapter over Consul's HTTP API (agent + health endpoints).

Theory of operation:
* One ``httpx.AsyncClient`` per ``ConsulClient`` (trio-native, connection pooling).
  Every request has a deadline: the client's ``timeout_seconds``, or for a blocking
  query ``wait + wait/16 + 5 s`` (Consul adds up to wait/16 of jitter to a wait), so a
  healthy blocking query never times out on our side.
* Errors are translated once, here (STYLE habit 7), into ``ConsulProblem``:
  ``ConsulUnavailable`` (refused, timed out, broken connection, 5xx) — retry later;
  ``ConsulError`` (4xx: bad request, ACL denied) — retrying will not help until someone
  fixes the token or the request. ``str()`` of both is one line naming the address.
* The JSON we write and read are msgspec Structs with Consul's PascalCase names;
  fields Consul adds later are ignored on decode.

``Backoff`` is here too: the retry delay every caller of this adapter uses.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Literal, Self
from urllib.parse import quote

import httpx
import msgspec
import trio

CheckStatus = Literal["passing", "warning", "critical"]

# Consul adds up to wait/16 of random jitter to a blocking query's wait; we add this on top.
_BLOCKING_MARGIN_SECONDS: Final = 5.0
# Consul caps ``wait`` at 10 minutes.
_MAX_WAIT_SECONDS: Final = 600.0
# Longest piece of a Consul error body quoted in our one-line messages.
_MAX_BODY_CHARS: Final = 300


class ConsulProblem(Exception):
    """Base class: Consul could not do what we asked. ``str()`` is one line."""


class ConsulUnavailable(ConsulProblem):
    """Consul is unreachable, too slow, or failing (5xx): try again later."""


class ConsulError(ConsulProblem):
    """Consul refused the request (4xx: malformed, ACL denied); the message quotes Consul."""


# ---------------------------------------------------------------------------- JSON shapes


class CheckDefinition(
    msgspec.Struct, frozen=True, kw_only=True, rename="pascal", omit_defaults=True
):
    """A TTL health check registered together with a service.

    ``ttl`` and ``deregister_critical_service_after`` are Consul duration strings ("30s").
    ``status`` is the initial status (Consul's default for TTL checks is critical).
    """

    check_id: str = msgspec.field(name="CheckID")
    name: str
    ttl: str = msgspec.field(name="TTL")
    deregister_critical_service_after: str | None = None
    notes: str | None = None
    status: CheckStatus | None = None


class ServiceRegistration(
    msgspec.Struct, frozen=True, kw_only=True, rename="pascal", omit_defaults=True
):
    """Body of ``PUT /v1/agent/service/register``."""

    id: str = msgspec.field(name="ID")
    name: str
    address: str = ""
    port: int = 0
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = {}
    check: CheckDefinition | None = None


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True, rename="pascal"):
    """``Node`` of a health entry (the Consul agent's node)."""

    node: str
    address: str = ""


class ServiceInfo(msgspec.Struct, frozen=True, kw_only=True, rename="pascal"):
    """``Service`` of a health entry. Consul may send null for empty tags or meta."""

    id: str = msgspec.field(name="ID")
    service: str
    address: str = ""
    port: int = 0
    tags: list[str] | None = None
    meta: dict[str, str] | None = None


class CheckInfo(msgspec.Struct, frozen=True, kw_only=True, rename="pascal"):
    """One element of ``Checks`` of a health entry."""

    check_id: str = msgspec.field(name="CheckID")
    name: str = ""
    status: str = ""
    output: str = ""
    service_id: str = msgspec.field(name="ServiceID", default="")


class ServiceEntry(msgspec.Struct, frozen=True, kw_only=True, rename="pascal"):
    """One element of ``GET /v1/health/service/<name>``."""

    node: NodeInfo
    service: ServiceInfo
    checks: list[CheckInfo] | None = None


_decode_entries = msgspec.json.Decoder(list[ServiceEntry]).decode
_encode = msgspec.json.Encoder().encode


# ---------------------------------------------------------------------------- the client


class ConsulClient:
    """Async adapter over Consul's agent and health HTTP API.

    Use as ``async with ConsulClient(address) as consul:`` or call ``aclose()``.

    Args:
        address: ``http://host:port`` or ``https://host:port`` of the local Consul agent.
        token: ACL token, sent as ``X-Consul-Token`` on every request when set.
        timeout_seconds: deadline of one ordinary (non-blocking) request.

    Raises:
        ConsulError: ``address`` is not an http(s) URL.
    """

    def __init__(
        self, address: str, *, token: str | None = None, timeout_seconds: float = 5.0
    ) -> None:
        self.address = address.rstrip("/")
        try:
            url: httpx.URL | None = httpx.URL(self.address)
        except httpx.InvalidURL:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise ConsulError(
                f"consul address {address!r} is not an http(s) URL; use e.g. http://127.0.0.1:8500"
            )
        self._timeout_seconds = timeout_seconds
        headers = {"User-Agent": "meshagent"}
        if token:
            headers["X-Consul-Token"] = token
        self._http = httpx.AsyncClient(
            base_url=self.address,
            headers=headers,
            timeout=httpx.Timeout(timeout_seconds),
            trust_env=False,  # $http_proxy and friends must not divert calls to the agent
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close pooled connections. Cancel point."""
        await self._http.aclose()

    # -- agent endpoints -------------------------------------------------------------------

    async def register_service(self, reg: ServiceRegistration) -> None:
        """Register (or replace) a service and its check on the local agent. Cancel point.

        Raises:
            ConsulUnavailable: Consul unreachable, too slow or failing.
            ConsulError: Consul rejected the registration (e.g. ACL denied).
        """
        response = await self._request(
            "PUT",
            "/v1/agent/service/register",
            params={"replace-existing-checks": "true"},
            content=_encode(reg),
        )
        self._raise_for_status(response, f"register service {reg.id}")

    async def deregister_service(self, service_id: str) -> None:
        """Remove a service (and its checks) from the local agent. Cancel point.

        Deregistering an unknown service succeeds: Consul 1.8 answers 200 for it, newer
        versions 404, and either way the service is gone, which is what we wanted.

        Raises:
            ConsulUnavailable, ConsulError: as ``register_service``.
        """
        response = await self._request(
            "PUT", f"/v1/agent/service/deregister/{_segment(service_id)}"
        )
        if response.status_code == 404:
            return
        self._raise_for_status(response, f"deregister service {service_id}")

    async def update_ttl(self, check_id: str, status: CheckStatus, output: str) -> bool:
        """Set a TTL check's status and output. Cancel point.

        Returns:
            True when Consul took the update; False when Consul does not know the check
            (typically: it restarted and lost its local state), so the caller should
            register the service again.

        Raises:
            ConsulUnavailable, ConsulError: as ``register_service``.
        """
        response = await self._request(
            "PUT",
            f"/v1/agent/check/update/{_segment(check_id)}",
            content=_encode({"Status": status, "Output": output}),
        )
        if _is_unknown_check(response):
            return False
        self._raise_for_status(response, f"update check {check_id}")
        return True

    # -- health endpoints ------------------------------------------------------------------

    async def health_service(
        self,
        name: str,
        *,
        index: int = 0,
        wait_seconds: float = 0,
        passing_only: bool = True,
    ) -> tuple[int, list[ServiceEntry]]:
        """Instances of service ``name``, as a (blocking) query. Cancel point.

        Args:
            name: the service name.
            index: the ``X-Consul-Index`` of the previous answer; with ``index > 0`` and
                ``wait_seconds > 0`` Consul holds the request until something changes or
                ``wait_seconds`` pass (plus up to 1/16 jitter). Otherwise it answers at once.
            wait_seconds: longest hold of a blocking query (capped at 10 minutes).
            passing_only: only instances whose checks all pass (``?passing=1``).

        Returns:
            ``(X-Consul-Index, entries)``; the index is 0 if Consul did not send one.

        Raises:
            ConsulUnavailable, ConsulError: as ``register_service``; also
                ConsulUnavailable when the answer is not the JSON Consul documents.
        """
        params: dict[str, str] = {}
        if passing_only:
            params["passing"] = "1"
        seconds = self._timeout_seconds
        # Consul treats wait=0 as its 5-minute default, so "no wait" is a plain read.
        if index > 0 and wait_seconds > 0:
            wait = min(wait_seconds, _MAX_WAIT_SECONDS)
            params["index"] = str(index)
            params["wait"] = f"{math.ceil(wait * 1000)}ms"
            seconds = wait + wait / 16 + max(_BLOCKING_MARGIN_SECONDS, self._timeout_seconds)
        response = await self._request(
            "GET", f"/v1/health/service/{_segment(name)}", params=params, seconds=seconds
        )
        what = f"health of service {name}"
        self._raise_for_status(response, what)
        try:
            entries = _decode_entries(response.content)
        except msgspec.DecodeError as exc:
            raise ConsulUnavailable(
                f"consul at {self.address} sent an unexpected answer for {what}: {exc}"
            ) from None
        try:
            new_index = int(response.headers.get("X-Consul-Index", "0"))
        except ValueError:
            new_index = 0
        return new_index, entries

    # -- plumbing --------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
        seconds: float | None = None,
    ) -> httpx.Response:
        """Send one request within ``seconds``; transport failures become ConsulUnavailable."""
        seconds = self._timeout_seconds if seconds is None else seconds
        try:
            # httpx's timeouts are per phase (connect, each read); this bounds the whole.
            with trio.fail_after(seconds + 1.0):
                return await self._http.request(
                    method, path, params=params, content=content, timeout=seconds
                )
        except (httpx.TimeoutException, trio.TooSlowError):
            raise ConsulUnavailable(
                f"consul at {self.address} unreachable: no answer within {seconds:g}s"
            ) from None
        except httpx.RequestError as exc:  # transport, protocol and decoding failures
            raise ConsulUnavailable(
                f"consul at {self.address} unreachable: {_describe(exc)}"
            ) from None

    def _raise_for_status(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status < 300:
            return
        body = _one_line(response.text)
        detail = f": {body}" if body else ""
        if status >= 500:
            raise ConsulUnavailable(
                f"consul at {self.address} failed to {what}: HTTP {status}{detail}"
            )
        hint = " (check the ACL token)" if status == 403 else ""
        raise ConsulError(
            f"consul at {self.address} refused to {what}: HTTP {status}{detail}{hint}"
        )


def _is_unknown_check(response: httpx.Response) -> bool:
    """Does this answer to a TTL update mean "no such check here"?

    Consul 1.8.7 answers 500 with ``CheckID "x" does not have associated TTL`` for a
    check it does not know (checked against a real 1.8.7; older versions said
    ``Unknown check``); newer versions answer 404. A 500 with any other body is a real
    server failure and stays ConsulUnavailable.
    """
    if response.status_code == 404:
        return True
    if response.status_code == 500:
        text = response.text
        return "does not have associated TTL" in text or "Unknown check" in text
    return False


def _segment(text: str) -> str:
    """Quote one URL path segment (IDs may hold ':' but never '/')."""
    return quote(text, safe=":@")


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    if len(line) > _MAX_BODY_CHARS:
        line = line[: _MAX_BODY_CHARS - 3] + "..."
    return line


def _describe(exc: BaseException) -> str:
    """A short lowercase reason for a transport failure ("connection refused")."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return "connection refused"
        if isinstance(current, OSError) and current.strerror:
            return current.strerror.lower()
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)
    return _one_line(str(exc)) or type(exc).__name__


# ---------------------------------------------------------------------------- retry delays


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with "decorrelated jitter": each delay is random in
    ``[initial, 3 × previous]``, never above ``maximum``. Pure; pass ``rng`` in tests.
    ``reset()`` after a success."""

    initial: float = 0.5
    maximum: float = 10.0
    rng: random.Random = field(default_factory=random.Random)
    _previous: float = 0.0

    def next_delay(self) -> float:
        upper = max(self.initial, 3 * (self._previous or self.initial))
        self._previous = min(self.maximum, self.rng.uniform(self.initial, upper))
        return self._previous

    def reset(self) -> None:
        self._previous = 0.0


__all__ = [
    "Backoff",
    "CheckDefinition",
    "CheckInfo",
    "CheckStatus",
    "ConsulClient",
    "ConsulError",
    "ConsulProblem",
    "ConsulUnavailable",
    "NodeInfo",
    "ServiceEntry",
    "ServiceInfo",
    "ServiceRegistration",
]
