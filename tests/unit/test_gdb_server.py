"""The gdb server's socket layer: TCP and Unix sockets, stops reported from other threads waking the
session, one session after another, a dropped connection or close() detaching, bad addresses."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from gdb_fake import CODE, VIRTUAL_BASE, FakeTarget, gdb_frame, parse_replies

from pyvmm.gdb.errors import GdbError
from pyvmm.gdb.server import GdbServer, parse_address


class Client:
    """gdb's end of the connection, acking every packet."""

    def __init__(self, address: str):
        kind, *where = parse_address(address)
        family = socket.AF_UNIX if kind == "unix" else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(where[0] if kind == "unix" else tuple(where))
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        while True:
            start = self.pending.find(b"$")
            end = self.pending.find(b"#", max(start, 0))
            if start >= 0 and end >= 0 and len(self.pending) >= end + 3:
                packets, _ = parse_replies(self.pending[start : end + 3])
                self.pending = self.pending[end + 3 :]
                try:
                    self.send(b"+")
                except BrokenPipeError:
                    pass  # the stub closes after D's OK
                return packets[0]
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the stub closed the connection")
            self.pending += data

    def request(self, payload: bytes) -> bytes:
        self.send(gdb_frame(payload))
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def tcp():
    target = FakeTarget(2, threaded=True)
    server = GdbServer(target, "127.0.0.1:0")
    server.start()
    yield target, server
    server.close()


def test_a_session_over_tcp_with_stops_from_another_thread(tcp):
    target, server = tcp
    client = Client(server.address)
    assert client.request(b"qSupported:swbreak+").startswith(b"PacketSize=")
    assert client.request(b"?") == b"T05thread:1;"
    assert client.request(b"Z0,%x,1" % (CODE + 3)) == b"OK"
    # the fake reports this stop from a timer thread: the server must be woken for it
    assert client.request(b"vCont;c") == b"T05thread:1;swbreak:;"
    assert client.request(b"vCont;s:2") == b"T05thread:2;"
    assert client.request(b"m%x,4" % CODE) == b"90909090"
    assert client.request(b"D") == b"OK"
    wait_for(lambda: target.detached)
    assert not target.breakpoints and target.memory[CODE + 3 - VIRTUAL_BASE] == 0x90
    client.close()
    assert not target.violations


def test_interrupt_over_the_socket(tcp):
    target, server = tcp
    for vcpu in range(2):
        target.memory[CODE + 0x100 * vcpu - VIRTUAL_BASE : CODE + 0x100 * vcpu - VIRTUAL_BASE + 2] = b"\xeb\xfe"
    client = Client(server.address)
    client.request(b"QStartNoAckMode")
    client.send(gdb_frame(b"c"))
    wait_for(lambda: target.running)
    client.send(b"\x03")
    assert client.reply() == b"T02thread:1;"
    client.close()


def test_sessions_one_after_another_and_a_dropped_connection_detaches(tcp):
    target, server = tcp
    first = Client(server.address)
    assert first.request(b"Z1,401000,1") == b"OK"
    first.close()  # gdb killed: no D
    wait_for(lambda: target.detached)
    assert not target.breakpoints
    target.detached = False
    second = Client(server.address)
    assert second.request(b"qC") == b"QC1"
    second.send(gdb_frame(b"k"))
    wait_for(lambda: target.killed)
    with pytest.raises(EOFError):
        while True:
            second.reply()
    second.close()
    wait_for(lambda: server.sessions == 2)


def test_gdb_gone_while_the_guest_runs(tcp):
    """The breakpoints come out at the stop the server asks for, not under running vCPUs."""
    target, server = tcp
    for vcpu in range(2):
        target.memory[CODE + 0x100 * vcpu - VIRTUAL_BASE : CODE + 0x100 * vcpu - VIRTUAL_BASE + 2] = b"\xeb\xfe"
    client = Client(server.address)
    assert client.request(b"Z0,%x,1" % (CODE + 0x80)) == b"OK"
    client.send(gdb_frame(b"c"))
    wait_for(lambda: target.running)
    client.close()
    wait_for(lambda: target.detached)
    assert target.interrupts == 1
    assert target.memory[CODE + 0x80 - VIRTUAL_BASE] == 0x90 and not target.breakpoints
    assert not target.violations


def test_unix_socket(tmp_path):
    path = str(tmp_path / "gdb.sock")
    target = FakeTarget(1)
    server = GdbServer(target, path)
    assert server.address == path
    server.start()
    try:
        client = Client(path)
        assert client.request(b"qfThreadInfo") == b"m1"
        assert client.request(b"D") == b"OK"
        client.close()
    finally:
        server.close()
    assert not (tmp_path / "gdb.sock").exists()


def test_a_stale_unix_socket_is_replaced_but_a_file_is_not(tmp_path):
    stale = tmp_path / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(stale))
    leftover.close()
    GdbServer(FakeTarget(1), str(stale)).close()
    plain = tmp_path / "file"
    plain.write_text("not a socket")
    with pytest.raises(GdbError, match="exists and is not a socket"):
        GdbServer(FakeTarget(1), str(plain))
    assert plain.read_text() == "not a socket"


def test_close_during_a_session_detaches(tcp):
    target, server = tcp
    client = Client(server.address)
    assert client.request(b"qC") == b"QC1"
    server.close()
    assert target.detached
    client.close()


def test_a_target_factory_is_called_per_connection():
    made = []

    def factory():
        made.append(FakeTarget(1))
        return made[-1]

    server = GdbServer(factory, "127.0.0.1:0")
    server.start()
    try:
        for _ in range(2):
            client = Client(server.address)
            assert client.request(b"D") == b"OK"
            client.close()
        wait_for(lambda: len(made) == 2 and all(t.detached for t in made))
    finally:
        server.close()


def test_parse_address():
    assert parse_address("127.0.0.1:1234") == ("tcp", "127.0.0.1", 1234)
    assert parse_address(":1234") == ("tcp", "127.0.0.1", 1234)
    assert parse_address("[::1]:1234") == ("tcp", "::1", 1234)
    assert parse_address("/run/gdb.sock") == ("unix", "/run/gdb.sock")
    assert parse_address("gdb.sock") == ("unix", "gdb.sock")
    with pytest.raises(GdbError, match="port 'x' is not a number"):
        parse_address("localhost:x")
    with pytest.raises(GdbError, match="port 70000 out of range"):
        parse_address("localhost:70000")
    with pytest.raises(GdbError, match="empty"):
        parse_address("")


def test_an_address_in_use_is_one_clear_error():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        with pytest.raises(GdbError, match=f"gdb address 127.0.0.1:{port}: Address already in use"):
            GdbServer(FakeTarget(1), f"127.0.0.1:{port}")
    finally:
        holder.close()


def test_serve_one_returns_when_closed_without_a_connection():
    server = GdbServer(FakeTarget(1), "127.0.0.1:0")
    thread = threading.Thread(target=server.serve_one)
    thread.start()
    time.sleep(0.1)
    server.close()
    thread.join(5)
    assert not thread.is_alive()
