"""Waiting for several fds at once: epoll where Linux has it, the ``selectors`` module elsewhere.

Interest masks are this module's ``READABLE``/``WRITABLE``, plus ``EDGE`` for
edge-triggered watching (epoll only: a ``Poller`` without it refuses such a
registration rather than spin on a level it cannot clear). ``poll`` returns
``(fd, mask)`` pairs in the same terms.
"""

from __future__ import annotations

import select
import selectors

READABLE = 1
WRITABLE = 2
EDGE = 4


class PollError(OSError):
    """A registration this poller cannot honour."""


class _EpollPoller:
    kind = "epoll"
    supports_edge = True

    def __init__(self):
        self._epoll = select.epoll()

    @staticmethod
    def _events(mask: int) -> int:
        events = (select.EPOLLIN if mask & READABLE else 0) | (select.EPOLLOUT if mask & WRITABLE else 0)
        return events | (select.EPOLLET if mask & EDGE else 0)

    def register(self, fd: int, mask: int) -> None:
        self._epoll.register(fd, self._events(mask))

    def modify(self, fd: int, mask: int) -> None:
        self._epoll.modify(fd, self._events(mask))

    def unregister(self, fd: int) -> None:
        self._epoll.unregister(fd)

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        ready = self._epoll.poll(-1 if timeout is None else timeout)
        out = []
        for fd, events in ready:
            mask = 0
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                mask |= READABLE
            if events & select.EPOLLOUT:
                mask |= WRITABLE
            out.append((fd, mask))
        return out

    def close(self) -> None:
        self._epoll.close()


class _SelectorPoller:
    supports_edge = False

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self.kind = type(self._selector).__name__.replace("Selector", "").lower()

    @staticmethod
    def _events(fd: int, mask: int) -> int:
        if mask & EDGE:
            raise PollError(f"fd {fd}: edge-triggered watching needs epoll (Linux)")
        return (selectors.EVENT_READ if mask & READABLE else 0) | (selectors.EVENT_WRITE if mask & WRITABLE else 0)

    def register(self, fd: int, mask: int) -> None:
        self._selector.register(fd, self._events(fd, mask))

    def modify(self, fd: int, mask: int) -> None:
        self._selector.modify(fd, self._events(fd, mask))

    def unregister(self, fd: int) -> None:
        self._selector.unregister(fd)

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        out = []
        for key, events in self._selector.select(timeout):
            mask = (READABLE if events & selectors.EVENT_READ else 0) | (WRITABLE if events & selectors.EVENT_WRITE else 0)
            out.append((key.fd, mask))
        return out

    def close(self) -> None:
        self._selector.close()


def Poller():  # noqa: N802 - a factory that reads as the class it returns
    """The best poller this platform has."""
    if hasattr(select, "epoll"):
        return _EpollPoller()
    return _SelectorPoller()
