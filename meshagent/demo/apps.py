"""Stand-ins for legacy apps, run as real processes: ``python -m meshagent.demo.apps``.

Modes:
  echo      echo every byte back; half-close when the client does
  reply     read to end of stream, then answer ``<name> got <n>`` and close (needs half-close)
"""

from __future__ import annotations

import argparse
import contextlib

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


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["echo", "reply"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="app")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, args.mode, args.host, args.port, args.name)
