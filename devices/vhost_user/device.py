"""A virtio device whose queues a vhost-user backend serves (virtio-fs today; -blk or -net later).

The model keeps what the guest sees of the device (features, config space) and hands the
data path to the backend process:

* at construction: GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER, GET_QUEUE_NUM
  (where the backend offers MQ), so ``device_features`` is known before the guest probes;
* on DRIVER_OK (``activate``): SET_FEATURES with what the driver accepted, SET_MEM_TABLE
  (every guest RAM region: its guest address, size, where pyvmm maps it and its offset in
  the memfd sent beside it), then per ready queue SET_VRING_NUM/BASE/ADDR (ring addresses
  translated from guest-physical to pyvmm's mapping), CALL and ERR (eventfds this device
  owns), KICK (the transport's notifier eventfd for that queue: the guest's kick reaches the
  backend without pyvmm reading it) and SET_VRING_ENABLE;
* on reset: GET_VRING_BASE per started queue, which stops it; DRIVER_OK starts it again.

The backend signals used buffers on the call eventfd. It cannot raise the interrupt itself
(through a KVM irqfd, say): virtio-mmio's driver reads InterruptStatus and ignores an
interrupt with no cause bit set, so pyvmm relays each call (``on_call``) into the transport,
which sets INTERRUPT_USED_BUFFER and raises the line. The backend applies EVENT_IDX
suppression before it signals, so every call is an interrupt due.

A backend that dies, hangs or misbehaves fails this device only: a ``VhostUserError`` (one
line) and DEVICE_NEEDS_RESET through the transport; the VMM and the vCPUs carry on.
"""

from __future__ import annotations

import ctypes
import logging

from pyvmm.devices.vhost_user import protocol as vu
from pyvmm.devices.vhost_user.frontend import Frontend, VhostUserError
from pyvmm.devices.vhost_user.protocol import MemRegion, VringAddr
from pyvmm.devices.virtio.device import COMMON_FEATURES, DeviceContext, DeviceHost, VirtioDevice
from pyvmm.host.notify import Notifier
from pyvmm.host.poll import READABLE

log = logging.getLogger("pyvmm.vhost_user")

#: protocol features this front end can use
SUPPORTED_PROTOCOL_FEATURES = 1 << vu.PROTOCOL_F_MQ | 1 << vu.PROTOCOL_F_REPLY_ACK


def host_address(buffer) -> int:
    """Where ``buffer`` (an mmap) lies in this process: the user address vhost-user speaks in."""
    export = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(export)
    finally:
        del export  # the export would keep the mmap from closing


def ring_sizes(queue_size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, available ring and used ring (with their event fields)."""
    return 16 * queue_size, 6 + 2 * queue_size, 6 + 8 * queue_size


class UserAddresses:
    """Guest-physical -> user (this process's) addresses, region by region."""

    def __init__(self, memory):
        self.regions = [(r.guest_addr, r.size, host_address(r.buffer)) for r in memory.regions]

    def translate(self, guest_addr: int, size: int) -> int:
        for start, length, user in self.regions:
            if start <= guest_addr and guest_addr + size <= start + length:
                return user + (guest_addr - start)
        raise VhostUserError(f"guest range {guest_addr:#x}+{size:#x} is not inside one RAM region")


class _Ring:
    """One started queue: the eventfds this device owns for it."""

    def __init__(self, index: int):
        self.index = index
        #: the backend has the kick fd: the ring runs until GET_VRING_BASE
        self.started = False
        self.call = Notifier("eventfd")
        self.err = Notifier("eventfd")

    def close(self) -> None:
        self.call.close()
        self.err.close()


class VhostUserDevice(VirtioDevice):
    """Base of the vhost-user devices: subclasses set ``device_id`` and the config space."""

    #: the transport leaves the queues (and their kick eventfds) to the backend
    external_queues = True
    #: virtio feature bits the guest may be offered, if the backend offers them too
    supported_features = COMMON_FEATURES

    def __init__(self, frontend: Frontend, *, name: str, queue_count: int, queue_size: int):
        super().__init__()
        self.name = name
        self.frontend = frontend
        self.queue_sizes = (queue_size,) * queue_count
        self._rings: list[_Ring] = []
        self.backend_features = frontend.get_features()
        self.protocol_features = 0
        if self.backend_features >> vu.F_PROTOCOL_FEATURES & 1:
            self.protocol_features = frontend.get_protocol_features() & SUPPORTED_PROTOCOL_FEATURES
            frontend.set_protocol_features(self.protocol_features)
        frontend.set_owner()
        if self.protocol_features >> vu.PROTOCOL_F_MQ & 1:
            offered = frontend.get_queue_num()
            if offered < queue_count:
                raise VhostUserError(f"{name}: the vhost-user backend serves {offered} queues; this device needs {queue_count}")
        log.info("%s: backend features %#x, protocol features %#x", name, self.backend_features, self.protocol_features)

    def device_features(self) -> int:
        return self.backend_features & self.supported_features

    def attach_host(self, host: DeviceHost) -> None:
        super().attach_host(host)
        host.watch(self.frontend.fileno(), READABLE, self._on_socket)

    # --- lifecycle ------------------------------------------------------------
    def activate(self, context: DeviceContext) -> None:
        super().activate(context)
        try:
            self._start(context)
        except BaseException:
            self._stop_rings()  # the rings that did start must not run on behind a failed device
            raise

    def _start(self, context: DeviceContext) -> None:
        if self.host is None or len(context.kick_fds) != len(context.queues):
            raise VhostUserError(f"{self.name}: a vhost-user device needs its transport attached to an event loop")
        memory = context.memory
        if not all(region.fd is not None for region in memory.regions):
            raise VhostUserError(f"{self.name}: guest RAM is not shared memory a vhost-user backend can map")
        frontend = self.frontend
        # The backend keeps protocol features on only if SET_FEATURES repeats the bit.
        frontend.set_features(context.features | self.backend_features & 1 << vu.F_PROTOCOL_FEATURES)
        addresses = UserAddresses(memory)
        frontend.set_mem_table([MemRegion(r.guest_addr, r.size, user, r.fd_offset)
                                for r, (_, _, user) in zip(memory.regions, addresses.regions)],
                               [r.fd for r in memory.regions])  # fmt: skip
        for queue in context.queues:
            if not queue.ready:
                continue
            ring = _Ring(queue.index)
            self._rings.append(ring)
            self.host.watch(ring.call.fileno(), READABLE, lambda _ev, r=ring: self.on_call(r))
            self.host.watch(ring.err.fileno(), READABLE, lambda _ev, r=ring: self._on_err(r))
            desc_size, avail_size, used_size = ring_sizes(queue.size)
            frontend.set_vring_num(queue.index, queue.size)
            frontend.set_vring_base(queue.index, 0)
            frontend.set_vring_addr(VringAddr(queue.index, 0,
                                              desc=addresses.translate(queue.desc_addr, desc_size),
                                              used=addresses.translate(queue.used_addr, used_size),
                                              avail=addresses.translate(queue.avail_addr, avail_size)))  # fmt: skip
            frontend.set_vring_call(queue.index, ring.call.fileno())
            frontend.set_vring_err(queue.index, ring.err.fileno())
            frontend.set_vring_kick(queue.index, context.kick_fds[queue.index])  # starts the ring
            ring.started = True
            if self.backend_features >> vu.F_PROTOCOL_FEATURES & 1:
                frontend.set_vring_enable(queue.index, True)  # rings start disabled with protocol features
        log.info("%s: %d queue(s) started on the vhost-user backend", self.name, sum(r.started for r in self._rings))

    def reset(self) -> None:
        """Stop every started ring; the reset itself always succeeds (see ``_stop_rings``)."""
        self._stop_rings()
        super().reset()

    def _stop_rings(self) -> None:
        """GET_VRING_BASE per started ring, which stops it in the backend. A backend that cannot
        answer is logged, not raised: the next DRIVER_OK reports it to the driver."""
        for ring in self._rings:
            if self.frontend.broken:
                break
            if not ring.started:
                continue
            try:
                self.frontend.get_vring_base(ring.index)
            except VhostUserError as err:
                log.warning("%s: stopping queue %d: %s", self.name, ring.index, err)
        self._forget_rings()

    def _forget_rings(self) -> None:
        rings, self._rings = self._rings, []
        for ring in rings:
            if self.host is not None:
                self.host.unwatch(ring.call.fileno())
                self.host.unwatch(ring.err.fileno())
            ring.close()

    def process_queue(self, index: int) -> None:
        """Queues are the backend's: the transport does not serve them (kicks go to the backend)."""

    def close(self) -> None:
        """Drop the connection (the backend sees it close) and the eventfds; no request is sent,
        so closing never waits on a backend that hangs."""
        if self.host is not None:
            self.host.unwatch(self.frontend.fileno())
        self._forget_rings()
        self.frontend.close()

    # --- event-loop callbacks (under the transport lock) ------------------------
    def on_call(self, ring: _Ring) -> None:
        # Not a KVM irqfd straight from the backend: virtio-mmio's InterruptStatus must say "used
        # buffer" before the line rises, or the guest's handler finds no cause and does nothing.
        if ring.call.clear() and self.context is not None:
            self.metrics.extra["calls"] = self.metrics.extra.get("calls", 0) + 1
            self.context.signal_used(ring.index)

    def _on_err(self, ring: _Ring) -> None:
        if ring.err.clear():
            raise VhostUserError(f"{self.name}: the vhost-user backend reported an error on queue {ring.index}")

    def _on_socket(self, _events: int) -> None:
        error = self.frontend.check_idle()
        if error is not None:
            self.host.unwatch(self.frontend.fileno())  # level-triggered: it would fire forever
            raise error
