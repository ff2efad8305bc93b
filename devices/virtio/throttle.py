"""A rate limiter on a virtqueue: admit requests, or stop the queue and resume it on a timer.

When a request does not fit the limiter, the device leaves its chain in the
available ring (``undo_pop``: the driver sees nothing consumed) and stops
serving that queue; the ``Throttle`` arms one timer, through the device's
``DeviceHost``, for when the tokens are expected, and the timer's callback
serves the queue again on the event-loop thread. While the timer is armed the
queue is not served at all (a guest kick cannot overtake the waiting request).
A device without a host (a sans-IO test that attached none) waits for the
driver's next kick instead.
"""

from __future__ import annotations

import time
from typing import Callable

from pyvmm.devices.ratelimit import RateLimiter, RateLimiterConfig


class Throttle:
    def __init__(self, device, config: RateLimiterConfig | None, resume: Callable[[], None], *,
                 clock: Callable[[], int] = time.monotonic_ns):  # fmt: skip
        self.device = device
        self.limiter = RateLimiter(config, clock=clock)
        self.resume = resume
        self.timer = None
        #: how often a request had to wait
        self.throttled = 0

    @property
    def blocked(self) -> bool:
        return self.timer is not None

    def admit(self, nbytes: int, ops: int = 1) -> bool:
        """True when the request may be served now (its tokens are spent); else the queue stops
        and the timer that resumes it is armed."""
        if self.timer is not None:
            return False
        if self.limiter.try_consume(nbytes, ops):
            return True
        self.throttled += 1
        host = self.device.host
        if host is not None:
            delay_us = -(-self.limiter.wait_ns(nbytes, ops) // 1000)  # rounded up: never wake before the tokens
            self.timer = host.call_later(delay_us / 1e6, self._fire)
        return False

    def _fire(self) -> None:
        self.timer = None
        if self.device.context is not None:
            self.resume()

    def configure(self, config: RateLimiterConfig) -> None:
        """A new limit, at once: the wait for the old one is dropped and the queue is served again
        (on the event loop, like every request)."""
        self.limiter.configure(config)
        self.cancel()
        if self.device.host is not None:
            self.timer = self.device.host.call_later(0, self._fire)

    def set_clock(self, clock: Callable[[], int]) -> None:
        """Measure time with ``clock`` (integer ns) from now on, e.g. a test's fake clock; the buckets restart full."""
        self.limiter.clock = clock
        self.limiter.configure(self.limiter.config)

    def drain(self, index: int, cost: Callable, handle: Callable) -> bool:
        """Serve the device's queue ``index``: through ``drain_throttled`` while the limiter limits or a
        wait is armed (True), else with the device's plain ``drain`` (no cost computed per request)."""
        if self.limiter.limits or self.blocked:
            drain_throttled(self.device, index, self, cost, handle)
            return True
        self.device.drain(index, handle)
        return False

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def drain_throttled(device, index: int, throttle: Throttle, cost: Callable, handle: Callable) -> None:
    """``VirtioDevice.drain`` under a limiter: ``cost(chain) -> bytes`` is charged (with one op) before
    ``handle(chain) -> used length`` serves it; a chain that does not fit stays available."""
    context = device.context
    queue, memory = context.queues[index], context.memory
    if not queue.ready or throttle.blocked:
        return
    while True:
        queue.disable_notification(memory)
        while (chain := queue.pop(memory)) is not None:
            if not throttle.admit(cost(chain)):
                queue.undo_pop()
                context.signal_used(index)  # what was served before the limit is announced
                return
            queue.add_used(memory, chain.head, handle(chain))
        if not queue.enable_notification(memory):
            break
    context.signal_used(index)
