"""The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2): one device per 4 KiB window.

A ``BusDevice``: the vCPU loop calls ``read(offset, data)`` / ``write(offset,
data)`` with offsets into the window. Interrupts go through an ``IrqLine``
held at level ``InterruptStatus != 0``.

Queue notifications arrive either as a QueueNotify bus write or, with KVM, as
an ioeventfd the builder registers at ``base + QUEUE_NOTIFY`` (datamatch =
queue index). ``attach(loop)`` creates one notifier per queue (host/notify.py: an
eventfd on Linux) and serves them on the event-loop thread, so requests are
never processed on a vCPU thread; the builder may hand the same eventfds to
KVM. Without ``attach`` (unit tests), a QueueNotify write processes the queue
synchronously.

A device whose queues another process serves (``external_queues``: vhost-user) gets the
notifiers' fds at DRIVER_OK (``DeviceContext.kick_fds``) and passes them on; the transport
then never reads them, so the guest's kick (a QueueNotify write here, or KVM's ioeventfd)
reaches that process directly. Its used-buffer signals come back through ``signal_used``.

Guest mistakes never escape: a ``QueueError`` (or any other failure while
serving the device) sets DEVICE_NEEDS_RESET and raises a configuration-change
interrupt for this device only.
"""

from __future__ import annotations

import logging
import threading

from pyvmm.devices.guestlog import GuestLog
from pyvmm.devices.irq import IrqLine
from pyvmm.host.notify import Notifier
from pyvmm.host.poll import READABLE
from pyvmm.devices.virtio.device import DeviceContext, VirtioDevice
from pyvmm.devices.virtio.queue import QueueError, SplitQueue
from pyvmm.devices.virtio.status import (
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    Step,
    features_problem,
    next_step,
)
from pyvmm.errors import PyvmmError

log = logging.getLogger("pyvmm.virtio")

MAGIC_VALUE = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x4D565950  # "PYVM"
WINDOW_SIZE = 0x1000

# Register offsets.
MAGIC = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

INTERRUPT_USED_BUFFER = 0x1
INTERRUPT_CONFIG_CHANGE = 0x2

# Registers that configure the selected queue: only between FEATURES_OK and DRIVER_OK.
_QUEUE_ADDRESS_REGS = {
    QUEUE_DESC_LOW: ("desc_addr", 0),
    QUEUE_DESC_HIGH: ("desc_addr", 32),
    QUEUE_DRIVER_LOW: ("avail_addr", 0),
    QUEUE_DRIVER_HIGH: ("avail_addr", 32),
    QUEUE_DEVICE_LOW: ("used_addr", 0),
    QUEUE_DEVICE_HIGH: ("used_addr", 32),
}


def cmdline_entry(base: int, irq: int, size: int = WINDOW_SIZE) -> str:
    """The kernel command-line entry that tells Linux's virtio_mmio driver about a device."""
    size_text = f"{size >> 10}K" if size % 1024 == 0 else str(size)
    return f"virtio_mmio.device={size_text}@{base:#x}:{irq}"


class VirtioMmio:
    """One virtio device behind its virtio-mmio register window."""

    def __init__(self, device: VirtioDevice, memory, irq: IrqLine, *, name: str | None = None):
        self.device = device
        self.memory = memory
        self.irq = irq
        self.name = name or device.name
        self.queues = [SplitQueue(index, size) for index, size in enumerate(device.queue_sizes)]
        # vCPU threads (registers) and the event-loop thread (queues) both enter the device.
        self.lock = threading.RLock()
        # InterruptStatus/ACK have their own lock so the guest's interrupt handler never waits
        # for a batch of device I/O running under ``lock`` on the event-loop thread.
        self._irq_lock = threading.Lock()
        self.counters = {"resets": 0, "needs_reset": 0, "interrupts": 0, "notifications": 0}
        #: what the guest can make this transport log, rate-limited per kind
        self.guest_log = GuestLog(log, self.name)
        self.last_error: str | None = None
        self._notify_fds: list[Notifier] = []
        self._loop = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.config_generation = 0
        for queue in self.queues:
            queue.reset()
        with self._irq_lock:
            self.interrupt_status = 0
            self.irq.set_level(False)

    # --- the bus interface ----------------------------------------------
    def read(self, offset: int, data: memoryview) -> None:
        if offset == INTERRUPT_STATUS and len(data) == 4:
            data[:] = self.interrupt_status.to_bytes(4, "little")  # an int read is atomic; no device lock
            return
        with self.lock:
            try:
                if offset >= CONFIG:
                    config = self.device.config_space()
                    start = offset - CONFIG
                    chunk = config[start : start + len(data)]
                    data[: len(chunk)] = chunk
                    data[len(chunk) :] = bytes(len(data) - len(chunk))
                    return
                value = self._read_register(offset) if len(data) == 4 and offset % 4 == 0 else 0
                data[:] = value.to_bytes(4, "little")[: len(data)].ljust(len(data), b"\0")
            except Exception as err:  # never let a device bug reach the vCPU loop
                data[:] = bytes(len(data))
                self.fail(err)

    def write(self, offset: int, data) -> None:
        notify_fds = self._notify_fds
        if offset == QUEUE_NOTIFY and notify_fds and len(data) == 4:
            # Kick the loop without the device lock: the loop thread may hold it for a whole batch.
            index = int.from_bytes(data, "little") & 0xFFFF
            self.counters["notifications"] += 1
            if index < len(notify_fds):
                notify_fds[index].notify()  # a closed notifier (shutdown) ignores it
            return
        if offset == INTERRUPT_ACK and len(data) == 4:
            self._ack(int.from_bytes(data, "little"))
            return
        with self.lock:
            try:
                if offset >= CONFIG:
                    self.device.write_config(offset - CONFIG, bytes(data))
                    return
                if len(data) != 4 or offset % 4:
                    log.debug("%s: ignored %d-byte write at register offset %#x", self.name, len(data), offset)
                    return
                self._write_register(offset, int.from_bytes(data, "little"))
            except Exception as err:
                self.fail(err)

    def _selected_queue(self) -> SplitQueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _read_register(self, offset: int) -> int:
        queue = self._selected_queue()
        if offset == MAGIC:
            return MAGIC_VALUE
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return self.device.device_features() >> (32 * self.device_features_sel) & 0xFFFFFFFF if self.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return queue.max_size if queue else 0
        if offset == QUEUE_NUM:
            return queue.size if queue else 0
        if offset == QUEUE_READY:
            return int(queue.ready) if queue else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH):
            return 0xFFFFFFFF  # no shared memory regions
        if offset in _QUEUE_ADDRESS_REGS and queue:
            attr, shift = _QUEUE_ADDRESS_REGS[offset]
            return getattr(queue, attr) >> shift & 0xFFFFFFFF
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        if offset == STATUS:
            self._write_status(value)
        elif offset == QUEUE_NOTIFY:  # not attached to a loop: serve synchronously (unit tests)
            self.counters["notifications"] += 1
            self.queue_notify(value & 0xFFFF)
        elif offset == INTERRUPT_ACK:
            self._ack(value)
        elif offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.status & ~DEVICE_NEEDS_RESET != ACKNOWLEDGE | DRIVER:
                raise QueueError(f"{self.name}: DriverFeatures written in status {self.status:#x} (before DRIVER or after FEATURES_OK)")
            if self.driver_features_sel < 2:
                shift = 32 * self.driver_features_sel
                self.driver_features = self.driver_features & ~(0xFFFFFFFF << shift) | value << shift
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset in (QUEUE_NUM, QUEUE_READY) or offset in _QUEUE_ADDRESS_REGS:
            self._write_queue_register(offset, value)
        else:
            log.debug("%s: ignored write of %#x to register %#x", self.name, value, offset)

    def _write_queue_register(self, offset: int, value: int) -> None:
        queue = self._selected_queue()
        if queue is None:
            log.debug("%s: queue register %#x written with QueueSel %d out of range", self.name, offset, self.queue_sel)
            return
        if offset == QUEUE_READY and value == 0 and not queue.ready:
            return  # Linux clears QueueReady again while tearing down after a reset
        if self.status & (FEATURES_OK | DRIVER_OK) != FEATURES_OK:
            raise QueueError(f"{self.name}: queue {queue.index} configured in status {self.status:#x} (only allowed after FEATURES_OK and before DRIVER_OK)")
        if offset == QUEUE_READY:
            if value == 1:
                queue.validate(self.memory)
                queue.ready = True
            else:
                queue.ready = False
            return
        if queue.ready:
            raise QueueError(f"{self.name}: queue {queue.index} reconfigured while ready")
        if offset == QUEUE_NUM:
            queue.size = value
        else:
            attr, shift = _QUEUE_ADDRESS_REGS[offset]
            setattr(queue, attr, getattr(queue, attr) & ~(0xFFFFFFFF << shift) | value << shift)

    def _write_status(self, value: int) -> None:
        step = next_step(self.status, value)
        if step is Step.RESET:
            self.reset()
        elif step in (Step.ACKNOWLEDGE, Step.DRIVER):
            self.status = value
        elif step is Step.FEATURES_OK:
            problem = features_problem(self.device.device_features(), self.driver_features)
            if problem:
                self.guest_log.info("features refused", "%s: FEATURES_OK refused: %s", self.name, problem)
                self.last_error = problem
            else:
                self.status = value
        elif step is Step.DRIVER_OK:
            self.status = value
            self._activate()
        elif step is Step.FAILED:
            self.guest_log.info("driver failed", "%s: the driver set FAILED (status %#x)", self.name, value)
            self.status |= FAILED
        elif step is Step.WRONG_ORDER:
            raise QueueError(f"{self.name}: status {value:#x} written out of order after {self.status:#x}")

    def _activate(self) -> None:
        features = self.driver_features
        for queue in self.queues:
            queue.event_idx = bool(features >> VIRTIO_F_EVENT_IDX & 1)
            queue.indirect = bool(features >> VIRTIO_F_INDIRECT_DESC & 1)
        kick_fds = [notifier.fileno() for notifier in self._notify_fds]
        self.device.activate(DeviceContext(self.memory, self.queues, features, self.signal_used, kick_fds))
        if self.device.external_queues:
            return
        # Chains the driver made available before DRIVER_OK are served now.
        for queue in self.queues:
            if queue.ready:
                self.device.process_queue(queue.index)

    # --- device side ------------------------------------------------------
    def reset(self) -> None:
        """Driver reset (Status = 0): every register and queue back to its initial value."""
        with self.lock:
            if self.status:
                self.counters["resets"] += 1
            self.device.reset()
            self._reset_state()

    @property
    def active(self) -> bool:
        return self.status & (DRIVER_OK | DEVICE_NEEDS_RESET | FAILED) == DRIVER_OK

    def queue_notify(self, index: int) -> None:
        """Serve queue ``index`` (call from the event-loop thread; never raises)."""
        with self.lock:
            if not self.active or index >= len(self.queues) or not self.queues[index].ready:
                return
            try:
                self.device.process_queue(index)
            except Exception as err:
                self.fail(err)

    def run_device(self, callback, *args) -> None:
        """Run a device callback (a host fd became ready) under the device lock; never raises."""
        with self.lock:
            if not self.active:
                return
            try:
                callback(*args)
            except Exception as err:
                self.fail(err)

    def signal_used(self, index: int) -> None:
        if self.device.external_queues:  # the backend already applied EVENT_IDX suppression
            self._interrupt(INTERRUPT_USED_BUFFER)
            return
        queue = self.queues[index]
        if queue.needs_notification(self.memory):
            self._interrupt(INTERRUPT_USED_BUFFER)

    def config_changed(self) -> None:
        """The device changed its config space (e.g. link status)."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            if self.status & DRIVER_OK:
                self._interrupt(INTERRUPT_CONFIG_CHANGE)

    def _interrupt(self, cause: int) -> None:
        with self._irq_lock:
            self.interrupt_status |= cause
            self.counters["interrupts"] += 1
            self.irq.set_level(True)

    def _ack(self, causes: int) -> None:
        with self._irq_lock:
            self.interrupt_status &= ~causes
            self.irq.set_level(self.interrupt_status != 0)

    def fail(self, err: BaseException) -> None:
        """The driver broke a rule or serving the device failed: NEEDS_RESET plus a config interrupt."""
        with self.lock:
            if isinstance(err, PyvmmError):
                self.guest_log.warning("needs reset", "%s: device needs reset: %s", self.name, err)
            else:
                self.guest_log.error("device failure", "%s: device failed, needs reset", self.name, exc_info=err)
            self.last_error = str(err)
            self.counters["needs_reset"] += 1
            self.device.metrics.errors += 1
            self.status |= DEVICE_NEEDS_RESET
            self._interrupt(INTERRUPT_CONFIG_CHANGE)

    # --- event loop wiring ----------------------------------------------
    def attach(self, loop) -> list[Notifier]:
        """Serve this device's queues and host fds on ``loop``'s thread.

        Returns one notifier per queue (index = queue index); where it is an eventfd the builder
        may also register it with KVM_IOEVENTFD at ``base + QUEUE_NOTIFY`` with datamatch = its
        index, so the guest's kick never leaves the kernel.
        """
        with self.lock:
            if self._loop is not None:
                raise PyvmmError(f"{self.name}: already attached to an event loop")
            self._loop = loop
            self._notify_fds = [Notifier() for _ in self.queues]
        for index, notifier in enumerate(self._notify_fds):
            if self.device.external_queues:
                break  # the device hands the notifiers to whoever serves its queues; pyvmm must not drain them
            loop.add_fd(notifier.fileno(), self._notify_callback(notifier, index), READABLE, on_error=self.fail,
                        name=f"{self.name} queue {index}")  # fmt: skip
        for fd, events, callback in self.device.poll_fds():
            loop.add_fd(fd, lambda ev, cb=callback: self.run_device(cb, ev), events, on_error=self.fail, name=f"{self.name} fd {fd}")
        self.device.attach_host(_TransportHost(self, loop))
        return list(self._notify_fds)

    def run_host_callback(self, callback, *args) -> None:
        """A ``DeviceHost`` callback: under the device lock whatever the driver's state (the device
        decides what an fd event means while inactive); a failure marks the device needs-reset."""
        with self.lock:
            try:
                callback(*args)
            except Exception as err:
                self.fail(err)

    def _notify_callback(self, notifier: Notifier, index: int):
        def on_notify(events: int) -> None:
            if notifier.clear():
                self.queue_notify(index)

        return on_notify

    def close(self) -> None:
        """Detach from the event loop and release the device's host resources."""
        with self.lock:
            loop, self._loop = self._loop, None
            notifiers, self._notify_fds = self._notify_fds, []
        if loop is not None:
            for notifier in notifiers:
                loop.remove_fd(notifier.fileno())
            for fd, _events, _callback in self.device.poll_fds():
                loop.remove_fd(fd)
            if isinstance(self.device.host, _TransportHost):
                self.device.host.unwatch_all()
        for notifier in notifiers:
            notifier.close()
        self.guest_log.flush()
        self.device.close()
        close_line = getattr(self.irq, "close", None)  # a line with host resources (KVM irqfd)
        if close_line is not None:
            close_line()

    def update_device(self, change) -> None:
        """Run ``change()`` on the device between requests (under the device lock), then tell the
        driver its configuration changed."""
        with self.lock:
            change()
            self.config_changed()

    # --- snapshots ----------------------------------------------------------
    _REGISTERS = ("status", "device_features_sel", "driver_features_sel", "driver_features", "queue_sel",
                  "config_generation")  # fmt: skip
    _QUEUE_FIELDS = ("size", "ready", "desc_addr", "avail_addr", "used_addr", "event_idx", "indirect", "next_avail",
                     "_known_avail", "next_used", "_last_signalled_used")  # fmt: skip

    def save_state(self) -> dict:
        """The transport's registers and each queue's configuration and indices (plain data).

        Taken while the VM is paused: the event loop is held, so no request is half-served."""
        with self.lock:
            return {
                "device_id": self.device.device_id,
                **{name: getattr(self, name) for name in self._REGISTERS},
                "interrupt_status": self.interrupt_status,
                "queues": [{name: getattr(q, name) for name in self._QUEUE_FIELDS} for q in self.queues],
            }

    def restore_state(self, state: dict) -> None:
        """Load ``save_state``'s output into this (freshly built, same device) transport; a device the
        driver had activated is activated again, and anything already made available is served."""
        with self.lock:
            if state.get("device_id") != self.device.device_id:
                raise QueueError(f"{self.name}: snapshot holds device id {state.get('device_id')}, this is "
                                 f"{self.device.device_id}")  # fmt: skip
            if len(state["queues"]) != len(self.queues):
                raise QueueError(f"{self.name}: snapshot has {len(state['queues'])} queues, the device {len(self.queues)}")
            for name in self._REGISTERS:
                setattr(self, name, int(state[name]))
            for queue, saved in zip(self.queues, state["queues"]):
                for name in self._QUEUE_FIELDS:
                    value = saved[name]
                    setattr(queue, name, bool(value) if isinstance(getattr(queue, name), bool) else int(value))
                if queue.ready:
                    queue.validate(self.memory)  # the guest's rings must still lie in guest RAM
            if self.active:
                self._activate()
            with self._irq_lock:
                self.interrupt_status = int(state["interrupt_status"])
                self.irq.set_level(self.interrupt_status != 0)

    def metrics(self) -> dict:
        """Counters for ``-v``: the device's requests/bytes/errors plus resets and interrupts."""
        with self.lock:
            return {"device": self.name, **self.device.metrics.as_dict(), **self.counters}



class _TransportHost:
    """``DeviceHost`` over the transport's event loop: callbacks run under the transport's lock."""

    def __init__(self, transport: VirtioMmio, loop):
        self._transport, self._loop = transport, loop
        self._watched: set[int] = set()

    def watch(self, fd: int, events: int, callback) -> None:
        run = self._transport.run_host_callback
        self._loop.add_fd(fd, lambda ev: run(callback, ev), events, on_error=self._transport.fail,
                          name=f"{self._transport.name} fd {fd}")  # fmt: skip
        self._watched.add(fd)

    def modify(self, fd: int, events: int) -> None:
        self._loop.modify_fd(fd, events)

    def unwatch(self, fd: int) -> None:
        if fd in self._watched:
            self._watched.discard(fd)
            self._loop.remove_fd(fd)

    def call_later(self, delay: float, callback):
        run = self._transport.run_host_callback
        return self._loop.call_later(delay, lambda: run(callback), name=f"{self._transport.name} timer")

    def unwatch_all(self) -> None:
        for fd in list(self._watched):
            self.unwatch(fd)
