"""virtio-rng / entropy device (virtio 1.2, section 5.4): host entropy from ``os.urandom``.

An optional rate limiter (Firecracker's entropy ``rate_limiter``) charges each
request one op and the bytes it asks for.
"""

from __future__ import annotations

import os

from pyvmm.devices.ratelimit import RateLimiterConfig
from pyvmm.devices.virtio.device import DEVICE_ID_RNG, VirtioDevice
from pyvmm.devices.virtio.throttle import Throttle

#: entropy handed out per request at most, so one greedy request cannot stall the loop
MAX_REQUEST_BYTES = 1 << 16


class VirtioRng(VirtioDevice):
    device_id = DEVICE_ID_RNG
    name = "virtio-rng"
    queue_sizes = (64,)

    def __init__(self, *, rate_limiter: RateLimiterConfig | None = None):
        super().__init__()
        self.throttle = Throttle(self, rate_limiter, lambda: self.process_queue(0))
        self.metrics.extra["throttled"] = 0

    def process_queue(self, index: int) -> None:
        if self.throttle.drain(index, lambda chain: min(chain.writable_len, MAX_REQUEST_BYTES), self.handle_request):
            self.metrics.extra["throttled"] = self.throttle.throttled

    def set_rate_limiter(self, config: RateLimiterConfig) -> None:
        """A new limit from now on; call under the transport's lock."""
        self.throttle.configure(config)

    def reset(self) -> None:
        super().reset()
        self.throttle.cancel()

    def close(self) -> None:
        self.throttle.cancel()

    def handle_request(self, chain) -> int:
        self.metrics.requests += 1
        budget = MAX_REQUEST_BYTES
        written = 0
        for view in chain.writable:
            size = min(len(view), budget - written)
            if size <= 0:
                break
            view[:size] = os.urandom(size)
            written += size
        self.metrics.bytes_read += written
        return written
