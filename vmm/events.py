"""The device event loop on its own thread: epoll on Linux, ``selectors`` elsewhere (host/poll.py).

Devices register host fds (queue-notify notifiers, tap fds) with callbacks,
and one-shot or periodic timers; other threads may add work with
``call_soon``. A wake-up notifier (host/notify.py) interrupts the wait for stop
and for new timers. A callback that raises is logged and handed to its
``on_error`` (the transport resets that device); the loop itself keeps running.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from typing import Callable

from pyvmm.errors import PyvmmError
from pyvmm.host.notify import Notifier
from pyvmm.host.poll import READABLE, PollError, Poller

log = logging.getLogger("pyvmm.events")


class EventLoopError(PyvmmError):
    """The event loop was misused (an fd registered twice, started twice, ...)."""


class Timer:
    """Handle of a ``call_later`` / ``call_every`` timer."""

    __slots__ = ("deadline", "interval", "callback", "on_error", "name", "cancelled")

    def __init__(self, deadline, interval, callback, on_error, name):
        self.deadline = deadline
        self.interval = interval
        self.callback = callback
        self.on_error = on_error
        self.name = name
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Handler:
    __slots__ = ("callback", "on_error", "name")

    def __init__(self, callback, on_error, name):
        self.callback = callback
        self.on_error = on_error
        self.name = name


class EventLoop:
    def __init__(self, name: str = "pyvmm-events"):
        self.name = name
        self._poller = Poller()
        self._wake = Notifier()
        self._wake_fd = self._wake.fileno()
        self._poller.register(self._wake_fd, READABLE)
        self._handlers: dict[int, _Handler] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._sequence = itertools.count()
        self._calls: deque = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._held = threading.Event()  # the loop thread waits in a hold() callback
        self._release = threading.Event()
        self.callback_errors = 0

    # --- registration (any thread) -----------------------------------------
    def add_fd(
        self,
        fd: int,
        callback: Callable[[int], None],
        events: int = READABLE,
        *,
        on_error: Callable[[BaseException], None] | None = None,
        name: str | None = None,
    ) -> None:
        """Call ``callback(events)`` on this loop's thread whenever ``fd`` is ready (host.poll masks)."""
        with self._lock:
            if fd in self._handlers or fd == self._wake_fd:
                raise EventLoopError(f"event loop {self.name}: fd {fd} is already registered")
            self._handlers[fd] = _Handler(callback, on_error, name or f"fd {fd}")
            try:
                self._poller.register(fd, events)
            except (OSError, ValueError) as err:
                del self._handlers[fd]
                why = str(err) if isinstance(err, PollError) else getattr(err, "strerror", None) or str(err)
                raise EventLoopError(f"event loop {self.name}: cannot watch fd {fd} ({name}): {why}") from err

    def modify_fd(self, fd: int, events: int) -> None:
        with self._lock:
            if fd not in self._handlers:
                raise EventLoopError(f"event loop {self.name}: fd {fd} is not registered")
            self._poller.modify(fd, events)

    def remove_fd(self, fd: int) -> None:
        """Stop watching ``fd`` (before closing it). Unknown fds are ignored."""
        with self._lock:
            if self._handlers.pop(fd, None) is not None:
                try:
                    self._poller.unregister(fd)
                except (OSError, ValueError, KeyError):
                    pass  # already closed by its owner

    def call_later(self, delay: float, callback: Callable[[], None], *, on_error=None, name: str | None = None) -> Timer:
        return self._add_timer(delay, None, callback, on_error, name)

    def call_every(self, interval: float, callback: Callable[[], None], *, on_error=None, name: str | None = None) -> Timer:
        if interval <= 0:
            raise EventLoopError(f"event loop {self.name}: timer interval {interval} must be positive")
        return self._add_timer(interval, interval, callback, on_error, name)

    def _add_timer(self, delay, interval, callback, on_error, name) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay), interval, callback, on_error, name or "timer")
        with self._lock:
            heapq.heappush(self._timers, (timer.deadline, next(self._sequence), timer))
        self._wake.notify()
        return timer

    def call_soon(self, callback: Callable, *args) -> None:
        """Run ``callback(*args)`` on the loop thread (thread-safe)."""
        self._calls.append((callback, args))
        self._wake.notify()

    # --- holding (a paused VM's devices) ----------------------------------
    def hold(self, timeout: float = 5.0) -> bool:
        """Let the callbacks already queued finish, then keep the loop thread from running any
        other until ``release()`` (or ``stop()``). True once held; False when it did not get there."""
        if not self.running:
            return True
        self._release.clear()
        self._held.clear()
        self.call_soon(self._hold_here)
        return self._held.wait(timeout)

    def _hold_here(self) -> None:
        self._held.set()
        while not self._release.wait(0.5):
            if self._stopping:
                return

    def release(self) -> None:
        self._release.set()

    # --- running ---------------------------------------------------------
    def start(self) -> None:
        """Run the loop on its own daemon thread."""
        if self._thread is not None:
            raise EventLoopError(f"event loop {self.name}: already started")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping:
            self.run_once()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop thread and wait for it (callbacks in progress finish first)."""
        self._stopping = True
        self._release.set()
        self._wake.notify()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("event loop %s: thread did not stop within %.1f s", self.name, timeout)

    def close(self) -> None:
        self.stop()
        if not self._closed:
            self._closed = True
            self._poller.close()
            self._wake.close()

    def __enter__(self) -> EventLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run_once(self, timeout: float | None = None) -> None:
        """Wait for events (at most ``timeout`` s, or until the next timer) and dispatch them."""
        with self._lock:
            next_deadline = self._timers[0][0] if self._timers else None
        wait = None if timeout is None else max(0.0, timeout)
        if next_deadline is not None:
            until_timer = max(0.0, next_deadline - time.monotonic())
            wait = until_timer if wait is None else min(wait, until_timer)
        if self._calls:
            wait = 0
        try:
            ready = self._poller.poll(wait)
        except InterruptedError:
            ready = []
        for fd, events in ready:
            if fd == self._wake_fd:
                self._wake.clear()
                continue
            handler = self._handlers.get(fd)
            if handler is not None:  # removed by an earlier callback of this round
                self._dispatch(handler.name, handler.on_error, handler.callback, events)
        while self._calls:
            callback, args = self._calls.popleft()
            self._dispatch(getattr(callback, "__name__", "call"), None, callback, *args)
        self._run_timers()

    def _run_timers(self) -> None:
        now = time.monotonic()
        due = []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
        for timer in due:
            if timer.cancelled:
                continue
            self._dispatch(timer.name, timer.on_error, timer.callback)
            if timer.interval is not None and not timer.cancelled:
                timer.deadline = max(timer.deadline + timer.interval, now)
                with self._lock:
                    heapq.heappush(self._timers, (timer.deadline, next(self._sequence), timer))

    def _dispatch(self, name, on_error, callback, *args) -> None:
        try:
            callback(*args)
        except Exception as err:
            self.callback_errors += 1
            log.error("event loop %s: %s callback failed", self.name, name, exc_info=err)
            if on_error is not None:
                try:
                    on_error(err)
                except Exception:
                    log.exception("event loop %s: error handler of %s failed", self.name, name)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
