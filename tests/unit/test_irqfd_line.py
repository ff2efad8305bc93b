"""vmm/irqfd.IrqfdLine against a stand-in VM: what it writes to the eventfds and when."""

from __future__ import annotations

import os
import time

import pytest

if not hasattr(os, "eventfd"):
    pytest.skip("KVM irqfds are Linux eventfds; this host has none", allow_module_level=True)

from conftest import wait_for
from pyvmm.vmm.irqfd import IrqfdLine


class FakeVm:
    def __init__(self):
        self.calls = []

    def irqfd(self, irq, eventfd, *, resample=None, deassign=False):
        self.calls.append((irq, eventfd, resample, deassign))


def _count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_raise_writes_the_trigger_and_lowering_leaves_it_to_the_eoi(loop):
    vm = FakeVm()
    line = IrqfdLine(17, vm, loop)
    (irq, trigger, resample, deassign), = vm.calls
    assert irq == 17 and resample is not None and not deassign
    line.set_level(True)
    assert _count(trigger) == 1
    line.set_level(False)
    assert _count(trigger) == 0
    line.close()


def test_resample_raises_again_only_while_the_device_still_asserts(loop):
    vm = FakeVm()
    line = IrqfdLine(18, vm, loop)
    _, trigger, resample, _ = vm.calls[0]
    line.set_level(True)
    assert _count(trigger) == 1
    os.eventfd_write(resample, 1)  # what KVM does at the guest's EOI
    assert wait_for(lambda: _count(trigger) == 1, timeout=2.0)  # still pending: raised again
    line.set_level(False)  # the guest acknowledged the interrupt status
    os.eventfd_write(resample, 1)
    time.sleep(0.05)
    assert _count(trigger) == 0
    line.close()


def test_close_deassigns_and_releases_the_fds(loop):
    vm = FakeVm()
    line = IrqfdLine(19, vm, loop)
    _, trigger, resample, _ = vm.calls[0]
    line.close()
    assert vm.calls[-1] == (19, trigger, resample, True)
    line.close()  # a second close does nothing
    assert len(vm.calls) == 2
