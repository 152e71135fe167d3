"""Stand-ins for legacy apps, run as real processes: ``python -m meshagent.demo.apps``.

Modes:
  echo      echo every byte back; half-close when the client does
  reply     read to end of stream, then answer ``<name> got <n>`` and close (needs half-close)
  http      an HTTP/1.1 app: JSON describing each request (see ``serve_http_app``)
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable

import h11
import trio


async def main(mode: str, host: str, port: int, name: str) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()

    async def reply(stream: trio.SocketStream) -> None:
        total = 0
        while data := await stream.receive_some(65536):
            total += len(data)
        await stream.send_all(f"{name} got {total}".encode())

    if mode == "http":
        await serve_http_app(name, host=host, port=port)
        return
    handler = echo if mode == "echo" else reply

    async def serve(stream: trio.SocketStream) -> None:
        try:
            async with stream:
                await handler(stream)
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(port, host=host)
    print("listening", flush=True)
    await trio.serve_listeners(serve, listeners)


Responder = Callable[[str, str, bytes], tuple[int, dict[str, object]]]
"""(method, path, body) -> (status, JSON answer): an app's own routes (see demo.legacy)."""
MAX_KEPT_BODY = 64 * 1024


async def _handle_http(
    stream: trio.SocketStream,
    name: str,
    status: int = 200,
    delay_seconds: float = 0.0,
    respond: Responder | None = None,
) -> None:
    conn = h11.Connection(h11.SERVER)

    async def next_event() -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await stream.receive_some(65536))

    async def send(*events: h11.Event) -> None:
        for event in events:
            data = conn.send(event)
            if data:
                await stream.send_all(data)

    try:
        while True:
            request = await next_event()
            if not isinstance(request, h11.Request):
                return
            headers = {k.decode().lower(): v.decode() for k, v in request.headers}
            if conn.they_are_waiting_for_100_continue:
                await send(h11.InformationalResponse(status_code=100, headers=[]))
            received = 0
            kept = bytearray()
            while True:
                event = await next_event()
                if isinstance(event, h11.Data):
                    received += len(event.data)
                    if respond is not None and len(kept) < MAX_KEPT_BODY:
                        kept += event.data[: MAX_KEPT_BODY - len(kept)]
                elif isinstance(event, h11.EndOfMessage):
                    break
            path = request.target.decode()
            if headers.get("upgrade") == "echo":
                await send(
                    h11.InformationalResponse(
                        status_code=101, headers=[("upgrade", "echo"), ("connection", "upgrade")]
                    )
                )
                leftover, _ = conn.trailing_data
                if leftover:
                    await stream.send_all(leftover)
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
                return
            if path == "/chunked":
                await send(
                    h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")])
                )
                for n in range(5):
                    await send(h11.Data(data=f"part{n};".encode()))
                await send(h11.EndOfMessage())
            elif path == "/close":
                await send(h11.Response(status_code=200, headers=[("connection", "close")]))
                await send(h11.Data(data=b"until the end"), h11.EndOfMessage())
                return
            else:
                if delay_seconds:
                    await trio.sleep(delay_seconds)
                answer_status = status
                if respond is not None:
                    answer_status, answer = respond(request.method.decode(), path, bytes(kept))
                    answer = {"app": name, **answer}
                else:
                    answer = {
                        "app": name,
                        "method": request.method.decode(),
                        "path": path,
                        "received": received,
                        "source": headers.get("x-meshagent-source"),
                        "request_id": headers.get("x-request-id"),
                        "traceparent": headers.get("traceparent"),
                    }
                body = json.dumps(answer).encode()
                await send(
                    h11.Response(
                        status_code=answer_status,
                        headers=[
                            ("content-type", "application/json"),
                            ("content-length", str(len(body))),
                            ("x-app", name),
                        ],
                    )
                )
                if request.method != b"HEAD":
                    await send(h11.Data(data=body))
                await send(h11.EndOfMessage())
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, h11.RemoteProtocolError, h11.LocalProtocolError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve_http_app(
    name: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    status: int = 200,
    delay_seconds: float = 0.0,
    respond: Responder | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A small HTTP/1.1 app (h11): GET/HEAD describe the request as JSON, POST counts
    the body, /chunked and /close exercise framing, ``Upgrade: echo`` becomes a tunnel.
    ``status`` and ``delay_seconds`` make a broken or slow instance."""
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def handler(stream: trio.SocketStream) -> None:
        await _handle_http(stream, name, status, delay_seconds, respond)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["echo", "reply", "http"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="app")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, args.mode, args.host, args.port, args.name)
