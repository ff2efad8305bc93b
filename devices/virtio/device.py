"""What every virtio device model provides to the transport.

A device model knows its type, features, config space and how to serve its
queues. It never touches registers or interrupt lines: the transport
activates it with a ``DeviceContext`` (guest memory, the live queues, the
negotiated features, and a ``signal_used(queue)`` callback) and calls
``process_queue(index)`` on the event-loop thread for each notification.

A device that owns host resources beyond its queues (sockets that come and go,
a timer that resumes a throttled queue) gets a ``DeviceHost`` when the
transport is attached to an event loop (``attach_host``): it watches fds and
arms timers through it, and its callbacks run on the event-loop thread under
the transport's lock, so they never race the queue handlers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

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
    #: per queue, the fd the guest's kicks arrive on (the transport's notifier eventfds), for a
    #: device whose queues another process serves (``external_queues``); empty when unattached
    kick_fds: list[int] = field(default_factory=list)

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class DeviceHost(Protocol):
    """Event-loop services for a device (``VirtioMmio`` provides them once attached).

    Callbacks run on the event-loop thread under the transport lock; an exception from one
    marks the device DEVICE_NEEDS_RESET, as a failing request does."""

    def watch(self, fd: int, events: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(events)`` whenever ``fd`` is ready (host.poll masks), until ``unwatch``."""

    def modify(self, fd: int, events: int) -> None:
        """Change the readiness a watched ``fd`` is polled for (e.g. add WRITABLE while output waits)."""

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (before the device closes it); unknown fds are ignored."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Call ``callback()`` once after ``delay`` seconds (cancellable)."""


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
    #: queues served outside pyvmm (vhost-user): the transport neither reads the kick notifiers nor
    #: walks the rings; the device gets the kick fds and signals used buffers itself
    external_queues: bool = False

    def __init__(self):
        self.metrics = Metrics()
        self.context: DeviceContext | None = None
        #: event-loop services, once the transport is attached to a loop (None in sans-IO tests)
        self.host: DeviceHost | None = None

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

    def attach_host(self, host: DeviceHost) -> None:
        """The transport was attached to an event loop: host fds and timers may be used from now on."""
        self.host = host

    def poll_fds(self) -> list[tuple[int, int, Callable[[int], None]]]:
        """Host fds the event loop should watch for this device: (fd, host.poll mask, callback)."""
        return []

    def close(self) -> None:
        """Release host resources (files, taps)."""

    def save_state(self) -> dict:
        """Device state beyond the transport's registers and queues, for a snapshot (plain data)."""
        return {}

    def restore_state(self, state: dict) -> None:
        """Load ``save_state``'s output into a device built from the same configuration."""

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
