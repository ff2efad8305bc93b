"""A wake-up signal between threads that an event loop can wait on: eventfd, pipe or socket pair.

``Notifier.notify()`` may be called from any thread; the fd (``fileno()``)
becomes readable until ``clear()``. On Linux it is an eventfd, which KVM also
takes directly (ioeventfd, irqfd): ``is_eventfd`` says so. Elsewhere it is a
non-blocking pipe (POSIX) or a socket pair (Windows, whose ``select`` watches
only sockets).
"""

from __future__ import annotations

import os
import socket
import threading


class Notifier:
    """One readable-when-notified fd. ``kind`` is "eventfd", "pipe" or "socketpair"."""

    def __init__(self, kind: str | None = None):
        kind = kind or default_kind()
        self.kind = kind
        self._lock = threading.Lock()  # notify() from vCPU threads vs close() from the VMM
        self._write_fd = -1
        self._sockets: tuple[socket.socket, socket.socket] | None = None
        if kind == "eventfd":
            self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        elif kind == "pipe":
            self._fd, self._write_fd = os.pipe()
            os.set_blocking(self._fd, False)
            os.set_blocking(self._write_fd, False)
        elif kind == "socketpair":
            reader, writer = socket.socketpair()
            reader.setblocking(False)
            writer.setblocking(False)
            self._sockets = (reader, writer)
            self._fd = reader.fileno()
        else:
            raise ValueError(f"unknown notifier kind {kind!r}")

    @property
    def is_eventfd(self) -> bool:
        return self.kind == "eventfd"

    def fileno(self) -> int:
        return self._fd

    def notify(self) -> None:
        """Make the fd readable (any thread). A closed notifier ignores it."""
        with self._lock:  # never a write to an fd number close() has just given back
            if self._fd < 0:
                return
            try:
                if self.kind == "eventfd":
                    os.eventfd_write(self._fd, 1)
                elif self.kind == "pipe":
                    os.write(self._write_fd, b"\1")
                else:
                    self._sockets[1].send(b"\1")
            except (BlockingIOError, InterruptedError):
                pass  # already full of notifications: one more changes nothing

    def clear(self) -> bool:
        """Consume every pending notification; True when there was one."""
        got = False
        if self._fd < 0:
            return False
        try:
            if self.kind == "eventfd":
                os.eventfd_read(self._fd)
                return True
            while True:
                data = os.read(self._fd, 4096) if self.kind == "pipe" else self._sockets[0].recv(4096)
                if not data:
                    return got
                got = True
        except (BlockingIOError, InterruptedError):
            return got
        except OSError:
            return False

    def close(self) -> None:
        with self._lock:
            fds, sockets = (self._fd, self._write_fd), self._sockets
            self._fd = self._write_fd = -1
            self._sockets = None
        if sockets is not None:
            for sock in sockets:
                sock.close()
        else:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)


def default_kind() -> str:
    """What this platform offers: eventfd on Linux, a pipe on other POSIX systems, sockets on Windows."""
    if hasattr(os, "eventfd"):
        return "eventfd"
    if os.name == "nt":
        return "socketpair"
    return "pipe"
