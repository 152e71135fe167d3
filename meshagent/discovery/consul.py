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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Literal, Self, TypeVar
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

    # -- KV store, transactions and sessions (used by the central agent's Consul store) --

    async def kv_get(
        self, key: str, *, index: int = 0, wait_seconds: float = 0
    ) -> tuple[int, KvEntry | None]:
        """One key, as a (blocking) query. Cancel point.

        Args:
            key: the full key (no leading ``/``).
            index: ``X-Consul-Index`` of the previous answer; with ``index > 0`` and
                ``wait_seconds > 0`` Consul holds the request until the key changes or
                the wait ends (plus up to 1/16 jitter). A missing key blocks too.
            wait_seconds: longest hold of a blocking query (capped at 10 minutes).

        Returns:
            ``(X-Consul-Index, entry)``; ``entry`` is None when the key does not exist.

        Raises:
            ConsulUnavailable: Consul unreachable, too slow, failing, or an answer that is
                not the JSON Consul documents.
            ConsulError: Consul refused the request (e.g. ACL denied).
        """
        params, seconds = self._blocking_params(index, wait_seconds)
        response = await self._request(
            "GET", f"/v1/kv/{_key_path(key)}", params=params, seconds=seconds
        )
        what = f"read key {key}"
        if response.status_code == 404:
            return _consul_index(response), None
        self._raise_for_status(response, what)
        entries = self._decode(_decode_kv_entries, response, what)
        return _consul_index(response), (entries[0] if entries else None)

    async def kv_list(
        self, prefix: str, *, index: int = 0, wait_seconds: float = 0
    ) -> tuple[int, list[KvEntry]]:
        """Every key under ``prefix`` (``?recurse``), as a (blocking) query. Cancel point.

        Args and Raises: as ``kv_get``; an empty prefix yields an empty list.

        Returns:
            ``(X-Consul-Index, entries)`` sorted by key (Consul's byte order).
        """
        params, seconds = self._blocking_params(index, wait_seconds)
        params["recurse"] = "true"
        response = await self._request(
            "GET", f"/v1/kv/{_key_path(prefix)}", params=params, seconds=seconds
        )
        what = f"list keys under {prefix}"
        if response.status_code == 404:
            return _consul_index(response), []
        self._raise_for_status(response, what)
        return _consul_index(response), self._decode(_decode_kv_entries, response, what)

    async def kv_put(
        self,
        key: str,
        value: bytes,
        *,
        cas: int | None = None,
        acquire: str | None = None,
        release: str | None = None,
    ) -> bool:
        """Write one key. Cancel point.

        Args:
            cas: check-and-set: write only if the key's ``ModifyIndex`` is this (0: only
                if the key does not exist).
            acquire: take the key's lock for this session (fails while another session
                holds it, or during the lock-delay after the holder's session ended).
            release: give up the lock this session holds.

        Returns:
            True when Consul wrote the key; False when a ``cas``, ``acquire`` or
            ``release`` condition did not hold.

        Raises:
            ConsulUnavailable, ConsulError: as ``kv_get``.
        """
        params: dict[str, str] = {}
        if cas is not None:
            params["cas"] = str(cas)
        if acquire is not None:
            params["acquire"] = acquire
        if release is not None:
            params["release"] = release
        response = await self._request(
            "PUT", f"/v1/kv/{_key_path(key)}", params=params, content=value
        )
        self._raise_for_status(response, f"write key {key}")
        return response.content.strip() == b"true"

    async def kv_delete(self, key: str, *, cas: int | None = None, recurse: bool = False) -> bool:
        """Delete one key, or every key under a prefix with ``recurse``. Cancel point.

        Deleting a key that does not exist succeeds (returns True), with ``cas`` too:
        Consul 1.8.7 counts a key that is already gone as deleted (as does the ``delete-cas``
        transaction verb; use ``check-index`` + ``delete`` to require the key).

        Returns:
            False when ``cas`` (the expected ``ModifyIndex``) did not match a key that exists.

        Raises:
            ConsulUnavailable, ConsulError: as ``kv_get``.
        """
        params: dict[str, str] = {}
        if cas is not None:
            params["cas"] = str(cas)
        if recurse:
            params["recurse"] = "true"
        response = await self._request("DELETE", f"/v1/kv/{_key_path(key)}", params=params)
        self._raise_for_status(response, f"delete key {key}")
        return response.content.strip() == b"true"

    async def txn(self, ops: Sequence[KvOp]) -> TxnResult:
        """Run KV operations as one atomic transaction (``PUT /v1/txn``). Cancel point.

        Consul applies all of them or none: a failed ``cas``/``check-*``/``get`` rolls
        the whole transaction back and is reported in ``TxnResult.errors`` (with the
        index of the failing operation), not raised. At most 64 operations.

        Raises:
            ConsulUnavailable: as ``kv_get``.
            ConsulError: malformed or too large (more than 64 operations, 413), ACL denied.
        """
        body = _encode([{"KV": op} for op in ops])
        response = await self._request("PUT", "/v1/txn", content=body)
        what = f"run a transaction of {len(ops)} operations"
        if response.status_code == 409:  # rolled back: the body says which op failed
            answer = self._decode(_decode_txn_answer, response, what)
            return TxnResult(ok=False, results=(), errors=tuple(answer.errors or ()))
        self._raise_for_status(response, what)
        answer = self._decode(_decode_txn_answer, response, what)
        results = tuple(item.kv for item in answer.results or () if item.kv is not None)
        return TxnResult(ok=True, results=results, errors=())

    async def session_create(
        self,
        *,
        name: str,
        ttl_seconds: float,
        lock_delay_seconds: float,
        behavior: Literal["release", "delete"] = "release",
    ) -> str:
        """Create a session on the local agent's node. Cancel point.

        Consul invalidates the session when it is not renewed for up to 2 x TTL (it
        doubles the TTL on its side), or when the node's health check fails. After an
        invalidation, locks the session held stay unavailable for ``lock_delay_seconds``
        (Consul's default, 15 s, outlives a deleted key; leader elections want ~1 s).

        Returns:
            The session ID.

        Raises:
            ConsulUnavailable: as ``kv_get`` (also: "Missing node registration" right
                after Consul starts, a 500 that passes).
            ConsulError: refused, e.g. a TTL outside Consul's ``session_ttl_min`` (10 s
                by default) to 24 h.
        """
        body = _encode(
            {
                "Name": name,
                "TTL": _duration(ttl_seconds),
                "LockDelay": _duration(lock_delay_seconds),
                "Behavior": behavior,
            }
        )
        response = await self._request("PUT", "/v1/session/create", content=body)
        what = f"create session {name}"
        if response.status_code == 500 and "Invalid Session TTL" in response.text:
            # Consul reports a TTL outside its range as a server failure; it is our request.
            raise ConsulError(
                f"consul at {self.address} refused to {what}: {_one_line(response.text)}"
            )
        self._raise_for_status(response, what)
        return self._decode(_decode_session_id, response, what).id

    async def session_renew(self, session_id: str) -> bool:
        """Reset a session's TTL. Cancel point.

        Returns:
            False when Consul no longer knows the session (it expired or was destroyed;
            its locks are gone), True otherwise.

        Raises:
            ConsulUnavailable, ConsulError: as ``kv_get``.
        """
        response = await self._request("PUT", f"/v1/session/renew/{_segment(session_id)}")
        if response.status_code == 404:
            return False
        self._raise_for_status(response, f"renew session {session_id}")
        return True

    async def session_destroy(self, session_id: str) -> None:
        """Destroy a session; Consul releases (behavior release) its locks. Cancel point.

        Destroying an unknown session succeeds. Locks it held stay unavailable to other
        sessions for the session's lock-delay; release them first to hand over at once.

        Raises:
            ConsulUnavailable, ConsulError: as ``kv_get``.
        """
        response = await self._request("PUT", f"/v1/session/destroy/{_segment(session_id)}")
        if response.status_code == 404:
            return
        self._raise_for_status(response, f"destroy session {session_id}")

    def _blocking_params(self, index: int, wait_seconds: float) -> tuple[dict[str, str], float]:
        """Query parameters and client deadline of a (blocking) read; see ``health_service``."""
        params: dict[str, str] = {}
        seconds = self._timeout_seconds
        if index > 0 and wait_seconds > 0:  # Consul treats wait=0 as its 5-minute default
            wait = min(wait_seconds, _MAX_WAIT_SECONDS)
            params["index"] = str(index)
            params["wait"] = f"{math.ceil(wait * 1000)}ms"
            seconds = wait + wait / 16 + max(_BLOCKING_MARGIN_SECONDS, self._timeout_seconds)
        return params, seconds

    def _decode(self, decode: Callable[[bytes], _T], response: httpx.Response, what: str) -> _T:
        """Decode a JSON answer; an unexpected shape becomes ConsulUnavailable."""
        try:
            return decode(response.content)
        except msgspec.DecodeError as exc:
            raise ConsulUnavailable(
                f"consul at {self.address} sent an unexpected answer to {what}: {exc}"
            ) from None


# ------------------------------------------------------------------ KV, txn, session shapes


KvVerb = Literal[
    "set",
    "cas",
    "lock",
    "unlock",
    "get",
    "get-tree",
    "check-index",
    "check-session",
    "check-not-exists",
    "delete",
    "delete-tree",
    "delete-cas",
]


class KvEntry(msgspec.Struct, frozen=True, kw_only=True, rename="pascal"):
    """One key of ``GET /v1/kv/<key>`` or of a transaction's results.

    ``value`` is None for a key written without a body (and in results of ``set``/``cas``
    operations, which Consul echoes without the value); ``session`` is the lock holder.
    """

    key: str
    value: bytes | None = None
    flags: int = 0
    create_index: int = 0
    modify_index: int = 0
    lock_index: int = 0
    session: str | None = None


class KvOp(msgspec.Struct, frozen=True, kw_only=True, rename="pascal", omit_defaults=True):
    """One KV operation of a transaction (``{"KV": {...}}`` of ``PUT /v1/txn``).

    ``index`` is the expected ``ModifyIndex`` for ``cas``, ``check-index`` and
    ``delete-cas`` (``cas`` with 0: only if the key does not exist).
    """

    verb: KvVerb
    key: str
    value: bytes | None = None
    index: int | None = None
    session: str | None = None


class TxnError(msgspec.Struct, frozen=True, kw_only=True, rename="pascal"):
    """Why a transaction rolled back: the failing operation and Consul's words."""

    op_index: int = 0
    what: str = ""


class TxnResult(msgspec.Struct, frozen=True, kw_only=True):
    """Outcome of ``ConsulClient.txn``: ``ok`` and the KV results, or the errors."""

    ok: bool
    results: tuple[KvEntry, ...] = ()
    errors: tuple[TxnError, ...] = ()


class _TxnResultItem(msgspec.Struct, frozen=True, kw_only=True):
    kv: KvEntry | None = msgspec.field(name="KV", default=None)


class _TxnAnswer(msgspec.Struct, frozen=True, kw_only=True, rename="pascal"):
    results: list[_TxnResultItem] | None = None
    errors: list[TxnError] | None = None


class _SessionId(msgspec.Struct, frozen=True, kw_only=True):
    id: str = msgspec.field(name="ID")


_T = TypeVar("_T")
_decode_kv_entries = msgspec.json.Decoder(list[KvEntry]).decode
_decode_txn_answer = msgspec.json.Decoder(_TxnAnswer).decode
_decode_session_id = msgspec.json.Decoder(_SessionId).decode


def _key_path(key: str) -> str:
    """Quote a KV key for the URL path, keeping its ``/`` separators."""
    return quote(key, safe="/:@")


def _duration(seconds: float) -> str:
    """A Consul (Go) duration string, in whole milliseconds: ``1500ms``."""
    return f"{max(0, round(seconds * 1000))}ms"


def _consul_index(response: httpx.Response) -> int:
    """``X-Consul-Index`` of an answer, 0 when absent or malformed."""
    try:
        return int(response.headers.get("X-Consul-Index", "0"))
    except ValueError:
        return 0


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
    "KvEntry",
    "KvOp",
    "KvVerb",
    "NodeInfo",
    "ServiceEntry",
    "ServiceInfo",
    "ServiceRegistration",
    "TxnError",
    "TxnResult",
]
