"""The agent's client of the central agent's dataplane API (see ``snapshot.wire``).

* One ``httpx.AsyncClient`` over TLS, verified against the central agent's own CA
  (``[central] ca``), never the system's trust store. Every call has a deadline.
* Two kinds of failure, because the agent treats them differently:
  ``CentralUnavailable`` (cannot connect, timed out, 5xx, an answer that is not ours):
  try again later, keep serving; ``CentralRefused`` (4xx: a bad token, a service the
  token does not allow): retrying the same request will not help, an operator must act.
* Secrets (join token, node credential) travel only in the Authorization header and
  never appear in an error or a log line.
* Replicas: ``[central] url`` may list several central agents on one store (no load
  balancer in front). Every call goes to the one in use (``url``); a call it cannot
  answer (``CentralUnavailable``) is tried on the next ones in turn, once each, and the
  first that answers becomes the one in use for every later call (sticky: no moving
  back while it works). A refusal is the store's answer, the same on every replica, so
  it is not tried elsewhere. When none answers, the error names each URL.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Final, TypeVar

import httpx
import msgspec
import trio

from meshagent import __version__
from meshagent.log import get_logger
from meshagent.snapshot.wire import (
    Certificates,
    DataplaneConfig,
    DataplaneUpdate,
    JoinRequest,
    JoinResponse,
    RenewRequest,
    StatusReport,
)

TIMEOUT_SECONDS: Final = 10.0
_T = TypeVar("_T")

log = get_logger("central")


class CentralProblem(Exception):
    """Base class; ``str()`` is one line naming the central agent and what failed."""


class CentralUnavailable(CentralProblem):
    """The central agent could not be reached or failed; worth retrying."""


class CentralRefused(CentralProblem):
    """The central agent refused the request (4xx); retrying will not help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def central_tls_context(ca_path: str) -> ssl.SSLContext:
    """Trust only the central agent's CA.

    Raises:
        ValueError: the file is missing or not a PEM certificate (one line).
    """
    try:
        return ssl.create_default_context(cafile=ca_path)
    except FileNotFoundError:
        raise ValueError(f"central.ca {ca_path}: no such file (the central agent's "
                         "central-ca.pem, in its data_dir)") from None
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"central.ca {ca_path}: not a readable PEM certificate ({exc})") from None


class CentralClient:
    """Calls of one agent to its central agent: one URL, or replicas tried in turn.
    Use as an async context manager.

    Args:
        urls: one URL or several (``[central] url``); the first is used first.
        tls: trusts the central agent's CA (``central_tls_context``).

    Raises:
        ValueError: no URL.
    """

    def __init__(self, urls: str | Sequence[str], tls: ssl.SSLContext) -> None:
        listed = [urls] if isinstance(urls, str) else list(urls)
        if not listed:
            raise ValueError("central.url: no URL")
        self.urls = tuple(url.rstrip("/") for url in listed)
        self._current = 0
        self._http = httpx.AsyncClient(
            verify=tls,
            timeout=TIMEOUT_SECONDS,
            headers={"User-Agent": f"meshagent/{__version__}"},
            trust_env=False,
            # Per replica: a long poll, a status report and a renewal at once.
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
        )

    @property
    def url(self) -> str:
        """The central agent in use: the last one that answered."""
        return self.urls[self._current]

    async def __aenter__(self) -> CentralClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------ calls

    async def join(self, token: str, request: JoinRequest) -> JoinResponse:
        return await self._call(
            "POST", "/v1/join", token, JoinResponse, body=msgspec.json.encode(request)
        )

    async def renew(
        self, node_token: str, mesh: str, dataplane: str, request: RenewRequest
    ) -> Certificates:
        return await self._call(
            "POST",
            f"{_dataplane_path(mesh, dataplane)}/certificates",
            node_token,
            Certificates,
            body=msgspec.json.encode(request),
        )

    async def config(
        self, node_token: str, mesh: str, dataplane: str, *, after: int, wait_seconds: float
    ) -> DataplaneConfig:
        """The dataplane's config; waits up to ``wait_seconds`` for a version other than
        ``after`` (a long poll)."""
        return await self._call(
            "GET",
            f"{_dataplane_path(mesh, dataplane)}/config",
            node_token,
            DataplaneConfig,
            params={"after": str(after), "wait": f"{wait_seconds:g}"},
            deadline_seconds=wait_seconds + TIMEOUT_SECONDS,
        )

    async def update(
        self, node_token: str, mesh: str, dataplane: str, update: DataplaneUpdate
    ) -> None:
        await self._call(
            "PUT",
            _dataplane_path(mesh, dataplane),
            node_token,
            None,
            body=msgspec.json.encode(update),
        )

    async def report(
        self, node_token: str, mesh: str, dataplane: str, status: StatusReport
    ) -> None:
        await self._call(
            "PUT",
            f"{_dataplane_path(mesh, dataplane)}/status",
            node_token,
            None,
            body=msgspec.json.encode(status),
        )

    # ------------------------------------------------------------------ plumbing

    async def _call(
        self,
        method: str,
        path: str,
        token: str,
        answer: type[_T] | None,
        *,
        body: bytes | None = None,
        params: dict[str, str] | None = None,
        deadline_seconds: float = TIMEOUT_SECONDS,
    ) -> _T:
        """The call on the central agent in use, then on the next ones in turn while
        they are unavailable; the first that answers is in use from then on.

        Raises:
            CentralRefused: a 4xx answer (from any of them: not tried further).
            CentralUnavailable: none answered; one line naming each URL tried.
        """
        start = self._current
        failures: list[CentralUnavailable] = []
        for step in range(len(self.urls)):
            index = (start + step) % len(self.urls)
            try:
                result = await self._call_one(
                    self.urls[index], method, path, token, answer,
                    body=body, params=params, deadline_seconds=deadline_seconds,
                )
            except CentralUnavailable as exc:
                failures.append(exc)
                continue
            if index != self._current:
                log.warning(
                    "using another central agent of central.url",
                    url=self.urls[index],
                    previous=self.urls[self._current],
                    error=str(failures[-1]) if failures else "",
                )
                self._current = index
            return result
        if len(failures) == 1:
            raise failures[0]
        raise CentralUnavailable(
            f"none of the {len(failures)} central agents of central.url answered: "
            + "; ".join(str(failure) for failure in failures)
        )

    async def _call_one(
        self,
        base: str,
        method: str,
        path: str,
        token: str,
        answer: type[_T] | None,
        *,
        body: bytes | None,
        params: dict[str, str] | None,
        deadline_seconds: float,
    ) -> _T:
        headers = {"Authorization": f"Bearer {token}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        where = f"central agent {base}"
        response = None
        with trio.move_on_after(deadline_seconds):
            try:
                response = await self._http.request(
                    method, base + path, content=body, params=params, headers=headers,
                    timeout=deadline_seconds,
                )
            except httpx.TimeoutException:
                pass
            except httpx.HTTPError as exc:
                raise CentralUnavailable(f"{where}: {_reason(exc)}") from None
        if response is None:
            raise CentralUnavailable(f"{where}: no answer within {deadline_seconds:g} s")
        if response.status_code >= 500 or response.status_code == 429:
            raise CentralUnavailable(f"{where}: {_error_of(response)}")
        if response.status_code >= 400:
            raise CentralRefused(response.status_code, f"{where}: {_error_of(response)}")
        if answer is None:
            return None  # type: ignore[return-value]
        try:
            return msgspec.json.decode(response.content, type=answer)
        except msgspec.DecodeError as exc:
            raise CentralUnavailable(
                f"{where}: {method} {path}: unexpected answer ({exc}); is the central "
                "agent the same meshagent version?"
            ) from None


def _dataplane_path(mesh: str, dataplane: str) -> str:
    return f"/v1/dataplanes/{mesh}/{dataplane}"


def _ssl_error_of(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc``: with trio, httpx says only ConnectError('') and the
    reason is a few causes down (trio's BrokenResourceError, then ssl's error)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _reason(exc: httpx.HTTPError) -> str:
    text = str(exc) or type(exc).__name__
    tls = _ssl_error_of(exc)
    if tls is not None and "CERTIFICATE_VERIFY_FAILED" not in text:
        text = f"{text}: {tls}"
    if "CERTIFICATE_VERIFY_FAILED" in text and "mismatch" in text:
        return (
            f"TLS certificate does not name this URL's host ({text}); use the central "
            "agent's listen address, or add the host to server_names in its central.toml "
            "and restart it"
        )
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            f"TLS certificate not trusted ({text}); is central.ca the central agent's "
            "central-ca.pem?"
        )
    return f"cannot connect: {text}"


def _error_of(response: httpx.Response) -> str:
    """The server's one-line error, or the status when the answer is not ours."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    text = str(error) if error else response.reason_phrase
    return f"HTTP {response.status_code}: {text}"
