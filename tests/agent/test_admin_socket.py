"""The admin endpoint on a unix socket: mode 0660, a stale file replaced, a live one
refused, removed on the way out."""

from __future__ import annotations

import errno
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from meshagent.agent.admin import AdminState, serve_admin
from meshagent.agent.metrics import AgentCollector, new_registry
from meshagent.snapshot.model import Snapshot


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="ma-"))  # AF_UNIX paths: at most 107 bytes
    try:
        yield directory
    finally:
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()


def admin_state() -> AdminState:
    snapshot = Snapshot(version=1, mesh="shop")
    return AdminState(new_registry(AgentCollector(dict, lambda: None, lambda: snapshot, {})))


async def get(path: Path, target: str) -> bytes:
    with trio.fail_after(5):
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            chunks = []
            while data := await stream.receive_some(65536):
                chunks.append(data)
    return b"".join(chunks)


async def test_serves_on_a_0660_socket_and_removes_it(socket_dir: Path) -> None:
    path = socket_dir / "admin.sock"
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_admin, f"unix:{path}", admin_state())
        assert port == 0
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        answer = await get(path, "/ready")
        assert answer.startswith(b"HTTP/1.1 503") and answer.endswith(b"starting\n")
        assert (await get(path, "/metrics")).startswith(b"HTTP/1.1 200")
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_a_stale_socket_is_replaced(socket_dir: Path) -> None:
    path = socket_dir / "admin.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as crashed:
        crashed.bind(str(path))  # bound, never listening: what a killed agent leaves
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_admin, f"unix:{path}", admin_state())
        assert (await get(path, "/ready")).startswith(b"HTTP/1.1 503")
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_a_live_socket_is_not_taken_over(socket_dir: Path) -> None:
    path = socket_dir / "admin.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen(1)
        with pytest.raises(OSError) as raised:
            await serve_admin(f"unix:{path}", admin_state())
        assert raised.value.errno == errno.EADDRINUSE
        assert path.exists()


async def test_a_file_that_is_not_a_socket_is_left_alone(socket_dir: Path) -> None:
    path = socket_dir / "admin.sock"
    path.write_text("not mine")
    with pytest.raises(OSError) as raised:
        await serve_admin(f"unix:{path}", admin_state())
    assert raised.value.errno == errno.EEXIST
    assert path.read_text() == "not mine"


async def test_a_missing_directory_is_an_oserror(socket_dir: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await serve_admin(f"unix:{socket_dir}/missing/admin.sock", admin_state())


async def test_a_replaced_socket_file_is_not_removed(socket_dir: Path) -> None:
    """If another agent took the path over meanwhile, ours does not delete its socket."""
    path = socket_dir / "admin.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_admin, f"unix:{path}", admin_state())
        os.unlink(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as newer:
            newer.bind(str(path))
            nursery.cancel_scope.cancel()
    assert stat.S_ISSOCK(path.lstat().st_mode)
