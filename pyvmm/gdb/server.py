"""Serve gdb on a TCP ``host:port`` or a Unix socket path: the socket layer around ``GdbStub``.

The listening socket is bound when ``GdbServer`` is made, so the VMM can create it before the
guest runs (``--gdb-wait``: the target holds the vCPUs, and reports ``StopReason.HALTED`` to
``attach``, until gdb resumes them). One connection is served at a time, on the server's thread:
bytes from gdb go to the stub; stop reports, which the target makes from its own threads through
``on_stop``, are queued and wake the thread through a socket pair. When a session ends (D, k, or
gdb going away) the server waits for the next connection until it is closed.
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable

from pyvmm.gdb.errors import GdbError
from pyvmm.gdb.stub import DebugTarget, GdbStub, StopEvent

log = logging.getLogger("pyvmm.gdb")

RECEIVE_SIZE = 0x10000
#: seconds to wait, once gdb is gone, for running vCPUs to stop so the breakpoints can come out
STOP_TIMEOUT = 10.0


def parse_address(text: str) -> tuple[str, str | int]:
    """``("tcp", host, port)`` for ``host:port`` (an empty host is 127.0.0.1, ``[v6]:port`` works),
    ``("unix", path)`` for anything with a slash or without a colon."""
    if "/" in text or ":" not in text:
        if not text:
            raise GdbError("gdb address is empty (expected host:port or a Unix socket path)")
        return ("unix", text)
    host, _, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise GdbError(f"gdb address {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 0xFFFF:
        raise GdbError(f"gdb address {text!r}: port {port} out of range")
    return ("tcp", host or "127.0.0.1", port)


def _listen(address: str) -> socket.socket:
    kind, *where = parse_address(address)
    listener = None
    try:
        if kind == "unix":
            (path,) = where
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)  # a socket left by an earlier run
                else:
                    raise GdbError(f"gdb socket path {path}: exists and is not a socket")
            except FileNotFoundError:
                pass
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
        else:
            host, port = where
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
        listener.listen(1)
    except OSError as err:
        if listener is not None:
            listener.close()
        raise GdbError(f"gdb address {address}: {err.strerror or err}") from err
    return listener


class GdbServer:
    """``target`` is a ``DebugTarget``, or a callable making one for each connection."""

    def __init__(self, target: DebugTarget | Callable[[], DebugTarget], address: str):
        self._make_target = (lambda: target) if isinstance(target, DebugTarget) else target
        self.listener = _listen(address)
        self.unix_path = address if self.listener.family == socket.AF_UNIX else None
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._closed = threading.Event()
        #: held while a thread serves (accepts or runs a session); close() waits for it
        self._serving = threading.Lock()
        self._thread: threading.Thread | None = None
        #: sessions served so far (tests wait on it)
        self.sessions = 0
        log.info("gdb: listening on %s", self.address)

    @property
    def address(self) -> str:
        """Where gdb connects: ``host:port`` (the real port when 0 was asked) or the socket path."""
        if self.unix_path is not None:
            return self.unix_path
        host, port = self.listener.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> threading.Thread:
        """Serve connections on a daemon thread until ``close``."""
        self._thread = threading.Thread(target=self.serve_forever, name="gdb-server", daemon=True)
        self._thread.start()
        return self._thread

    def serve_forever(self) -> None:
        while not self._closed.is_set():
            self.serve_one()

    def serve_one(self) -> None:
        """Wait for one gdb connection and serve it to its end (or until ``close``)."""
        with self._serving:
            if self._closed.is_set():
                return
            conn = self._accept()
            if conn is None:
                return
            try:
                self._session(conn)
            except Exception:
                log.exception("gdb: the session failed")
            finally:
                conn.close()
                self.sessions += 1

    def close(self) -> None:
        """Stop serving: a session in progress ends as if gdb had gone (the guest runs on)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake()
        # the serving thread lets go of the sockets before they are closed (unless this is it)
        if self._thread is not threading.current_thread():
            if self._serving.acquire(timeout=STOP_TIMEOUT + 5):
                self._serving.release()
            else:
                log.warning("gdb: the server thread did not stop")
            if self._thread is not None:
                self._thread.join(timeout=5)
        self.listener.close()
        if self.unix_path is not None:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass
        self._wake_read.close()
        self._wake_write.close()

    # ------------------------------------------------------------ internals

    def _wake(self) -> None:
        try:
            self._wake_write.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (the pipe is full), or closed

    def _drain_wake(self) -> None:
        try:
            while self._wake_read.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _accept(self) -> socket.socket | None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.listener, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while not self._closed.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._wake_read:
                        self._drain_wake()
                    else:
                        try:
                            conn, peer = self.listener.accept()
                        except OSError as err:
                            log.warning("gdb: accept failed: %s", err)
                            continue
                        log.info("gdb: connection from %s", peer or "a Unix socket")
                        return conn
        return None

    def _session(self, conn: socket.socket) -> None:
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stops: queue.SimpleQueue[StopEvent] = queue.SimpleQueue()

        def on_stop(event: StopEvent) -> None:  # any thread
            stops.put(event)
            self._wake()

        target = self._make_target()
        stub = GdbStub(target, target.attach(on_stop))
        connected = True
        give_up_at = None  # once gdb is gone: how long to wait for the vCPUs to stop
        with selectors.DefaultSelector() as selector:
            selector.register(conn, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while not stub.finished:
                if connected and self._closed.is_set():
                    connected = False
                if not connected and give_up_at is None:
                    selector.unregister(conn)
                    stub.connection_lost()
                    give_up_at = time.monotonic() + STOP_TIMEOUT
                    continue
                timeout = None if give_up_at is None else give_up_at - time.monotonic()
                if timeout is not None and timeout <= 0:
                    stub.abandon()
                    break
                for key, _ in selector.select(timeout):
                    if key.fileobj is self._wake_read:
                        self._drain_wake()
                        continue
                    try:
                        data = conn.recv(RECEIVE_SIZE)
                    except OSError:
                        data = b""
                    if not data:
                        log.info("gdb: connection closed")
                        connected = False
                        break
                    stub.receive(data)
                while True:
                    try:
                        stub.stopped(stops.get_nowait())
                    except queue.Empty:
                        break
                output = stub.data_to_send()
                if output and connected:
                    try:
                        conn.sendall(output)
                    except OSError as err:
                        log.info("gdb: connection lost: %s", err)
                        connected = False
