"""virtio-rng / entropy device (virtio 1.2, section 5.4): host entropy from ``os.urandom``."""

from __future__ import annotations

import os

from pyvmm.devices.virtio.device import DEVICE_ID_RNG, VirtioDevice

#: entropy handed out per request at most, so one greedy request cannot stall the loop
MAX_REQUEST_BYTES = 1 << 16


class VirtioRng(VirtioDevice):
    device_id = DEVICE_ID_RNG
    name = "virtio-rng"
    queue_sizes = (64,)

    def process_queue(self, index: int) -> None:
        self.drain(index, self.handle_request)

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
