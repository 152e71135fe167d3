"""A small real HTTP/1.1 app on trio + h11 for proxy tests.

Routes: any GET/HEAD answers JSON describing what the app saw (its name, method, path,
the mesh headers); POST counts the body bytes it received (streamed, never held);
GET /chunked answers in chunks; GET /close answers with Connection: close and a body
ended by the close; a request with ``Upgrade: echo`` gets 101 and then an echo tunnel.
"""

from __future__ import annotations

import json

import h11
import trio


async def _handle(stream: trio.SocketStream, name: str) -> None:
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
            received = 0
            while True:
                event = await next_event()
                if isinstance(event, h11.Data):
                    received += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
            path = request.target.decode()
            if headers.get("upgrade") == "echo":
                await send(h11.InformationalResponse(status_code=101, headers=[("upgrade", "echo"), ("connection", "upgrade")]))
                leftover, _ = conn.trailing_data
                if leftover:
                    await stream.send_all(leftover)
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
                return
            if path == "/chunked":
                await send(h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")]))
                for n in range(5):
                    await send(h11.Data(data=f"part{n};".encode()))
                await send(h11.EndOfMessage())
            elif path == "/close":
                await send(h11.Response(status_code=200, headers=[("connection", "close")]))
                await send(h11.Data(data=b"until the end"), h11.EndOfMessage())
                return
            else:
                body = json.dumps({
                    "app": name, "method": request.method.decode(), "path": path,
                    "received": received,
                    "source": headers.get("x-meshagent-source"),
                    "request_id": headers.get("x-request-id"),
                    "traceparent": headers.get("traceparent"),
                }).encode()
                await send(h11.Response(status_code=200, headers=[
                    ("content-type", "application/json"), ("content-length", str(len(body))),
                    ("x-app", name)]))
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
    name: str, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, name)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])
