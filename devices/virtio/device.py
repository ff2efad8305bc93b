"""What every virtio device model provides to the transport.

A device model knows its type, features, config space and how to serve its
queues. It never touches registers or interrupt lines: the transport
activates it with a ``DeviceContext`` (guest memory, the live queues, the
negotiated features, and a ``signal_used(queue)`` callback) and calls
``process_queue(index)`` on the event-loop thread for each notification.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pyvmm.devices.virtio.queue import SplitQueue
from pyvmm.devices.virtio.status import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1

# Device IDs (virtio 1.2, section 5).
DEVICE_ID_NET = 1
DEVICE_ID_BLOCK = 2
DEVICE_ID_RNG = 4

#: transport/ring features every pyvmm device offers
COMMON_FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX


@dataclass
class DeviceContext:
    memory: object  # GuestMemory
    queues: list[SplitQueue]
    features: int
    #: tell the transport chains were used on a queue (it decides whether to interrupt)
    signal_used: Callable[[int], None]

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)


@dataclass
class Metrics:
    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "errors": self.errors,
            **self.extra,
        }


class VirtioDevice:
    """Base class: subclasses set ``device_id``, ``name``, ``queue_sizes`` and serve requests."""

    device_id: int = 0
    name: str = "virtio"
    queue_sizes: tuple[int, ...] = (256,)

    def __init__(self):
        self.metrics = Metrics()
        self.context: DeviceContext | None = None

    # --- negotiation and config --------------------------------------
    def device_features(self) -> int:
        return COMMON_FEATURES

    def config_space(self) -> bytes:
        """The device-specific configuration space as the driver reads it at offset 0x100."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote device config space; read-only by default (writes are dropped)."""

    # --- lifecycle ------------------------------------------------------
    def activate(self, context: DeviceContext) -> None:
        """The driver set DRIVER_OK: start serving ``context.queues``."""
        self.context = context

    def reset(self) -> None:
        """The driver (or a failure) reset the device: drop all queue state."""
        self.context = None

    def process_queue(self, index: int) -> None:
        """The driver notified queue ``index`` (called on the event-loop thread)."""

    def poll_fds(self) -> list[tuple[int, int, Callable[[int], None]]]:
        """Host fds the event loop should watch for this device: (fd, host.poll mask, callback)."""
        return []

    def close(self) -> None:
        """Release host resources (files, taps)."""

    # --- helpers for subclasses ------------------------------------------
    def drain(self, index: int, handle: Callable) -> None:
        """Serve every available chain of queue ``index`` with ``handle(chain) -> used length``."""
        context = self.context
        queue, memory = context.queues[index], context.memory
        if not queue.ready:
            return
        while True:
            queue.disable_notification(memory)
            while (chain := queue.pop(memory)) is not None:
                queue.add_used(memory, chain.head, handle(chain))
            if not queue.enable_notification(memory):
                break
        context.signal_used(index)
