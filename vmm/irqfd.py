"""A device interrupt line the hypervisor drives itself: KVM irqfd with resampling.

Raising a line with KVM_IRQ_LINE is an ioctl from the device thread per
change; with an irqfd the event loop only writes an eventfd and KVM injects
the interrupt. virtio-mmio lines are level-triggered (the DSDT says so), so the
irqfd is registered with a resample eventfd: KVM lowers the line when the
guest EOIs it and signals the resample fd, and the line is raised again at
once if the device still has an interrupt pending (the scheme QEMU and
crosvm use for level-triggered irqfds).
"""

from __future__ import annotations

import os

from pyvmm.devices.irq import IrqLine
from pyvmm.host.poll import READABLE


class IrqfdLine(IrqLine):
    __slots__ = ("_vm", "_events", "_trigger", "_resample")

    def __init__(self, irq: int, vm, events):
        super().__init__(irq, lambda irq, level: None)
        self._vm = vm
        self._events = events
        self._trigger = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._resample = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            vm.irqfd(irq, self._trigger, resample=self._resample)
            events.add_fd(self._resample, self._on_resample, READABLE, name=f"irqfd resample (IRQ {irq})")
        except BaseException:
            os.close(self._trigger)
            os.close(self._resample)
            raise

    def set_level(self, level: bool) -> None:
        self.level = bool(level)
        if self.level:
            os.eventfd_write(self._trigger, 1)
        # Lowering needs nothing: KVM lowers the line at the guest's EOI (then _on_resample).

    def pulse(self) -> None:
        os.eventfd_write(self._trigger, 1)

    def _on_resample(self, _events: int) -> None:
        try:
            os.eventfd_read(self._resample)
        except BlockingIOError:
            return
        if self.level:
            os.eventfd_write(self._trigger, 1)

    def close(self) -> None:
        if self._trigger < 0:
            return
        self._events.remove_fd(self._resample)
        try:
            self._vm.irqfd(self.irq, self._trigger, resample=self._resample, deassign=True)
        except Exception:  # the VM may be gone already; its irqfds went with it
            pass
        os.close(self._trigger)
        os.close(self._resample)
        self._trigger = self._resample = -1
