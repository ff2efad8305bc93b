"""accel/irqchip/kvmstate.py: pyvmm's interrupt controllers <-> KVM's structures, without and with KVM."""

from __future__ import annotations

import pytest

from pyvmm import accel
from pyvmm.accel.irqchip import Irqchip, kvmstate
from pyvmm.accel.irqchip.lapic import LVT_TIMER


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def programmed_chip(clock) -> Irqchip:
    """Two vCPUs with a periodic LAPIC timer, a masked LINT0, an IOAPIC route, both 8259s set up
    and PIT channel 0 in rate-generator mode: what a booted guest leaves."""
    chip = Irqchip(2, clock=clock)
    for cpu in (0, 1):
        chip.mmio_write(cpu, 0xFEE000F0, 4, 0x1FF)  # SVR: enabled
        chip.mmio_write(cpu, 0xFEE00080, 4, 0x20)  # TPR
        chip.mmio_write(cpu, 0xFEE003E0, 4, 0x3)  # divide by 16
        chip.mmio_write(cpu, 0xFEE00320, 4, 0x20000 | 0xEC)  # periodic, vector 0xec
        chip.mmio_write(cpu, 0xFEE00380, 4, 100_000_000)  # a 1.6 s period: longer than any slack below
    chip.mmio_write(0, 0xFEC00000, 4, 0x10 + 2 * 4)  # IOAPIC: redirection entry of pin 4
    chip.mmio_write(0, 0xFEC00010, 4, 0x34)
    for port, value in ((0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFB),
                        (0xA0, 0x11), (0xA1, 0x38), (0xA1, 0x02), (0xA1, 0x01), (0xA1, 0xFF)):  # fmt: skip
        chip.pio_write(0, port, 1, value)
    chip.pio_write(0, 0x43, 1, 0x34)  # channel 0, rate generator, word
    chip.pio_write(0, 0x40, 1, 0x9C)
    chip.pio_write(0, 0x40, 1, 0x2E)
    clock.now += 0.003
    return chip


def assert_same_devices(a: Irqchip, b: Irqchip, *, seconds: float = 0.0) -> None:
    """Equal registers; counts within what ``seconds`` of real time moves them (KVM's run while ours wait)."""
    from pyvmm.accel.irqchip.lapic import LAPIC_TIMER_HZ

    for la, lb in zip(a.lapics, b.lapics):
        assert (la.svr, la.tpr, la.lvt, la.timer_initial, la.timer_divide, la.irr, la.isr) == (
            lb.svr, lb.tpr, lb.lvt, lb.timer_initial, lb.timer_divide, lb.irr, lb.isr)
        slack = 2 + seconds * LAPIC_TIMER_HZ / la.timer_divisor()
        assert abs(la.timer_current(a.clock()) - lb.timer_current(b.clock())) <= slack
    assert a.ioapic.redirection == b.ioapic.redirection and a.ioapic.id == b.ioapic.id
    for name in ("master", "slave"):
        pa, pb = getattr(a.pic, name), getattr(b.pic, name)
        assert (pa.imr, pa.irq_base, pa.init_state, pa.auto_eoi, pa.elcr) == (pb.imr, pb.irq_base, pb.init_state,
                                                                             pb.auto_eoi, pb.elcr)  # fmt: skip
    ca, cb = a.pit.channels[0], b.pit.channels[0]
    assert (ca.mode, ca.reload, ca.rw_mode, ca.bcd, ca.gate) == (cb.mode, cb.reload, cb.rw_mode, cb.bcd, cb.gate)
    if not seconds:  # KVM's PIT wraps every 10 ms: only its registers are comparable then
        assert abs(ca.count(a.clock()) - cb.count(b.clock())) <= 50


def test_the_conversion_round_trips_through_kvms_structures():
    clock = Clock()
    chip = programmed_chip(clock)
    platform, pages = kvmstate.to_kvm(chip)
    assert len(bytes.fromhex(platform["irqchip"]["ioapic"])) == 520 and len(pages[0]) == 1024
    again = Irqchip(2, clock=clock)
    kvmstate.load_from_kvm(again, platform, pages)
    assert_same_devices(chip, again)
    assert again.lapics[0].lvt[LVT_TIMER] & 0x20000, "still periodic"
    assert again.next_deadline(0) is not None, "the timer is armed after the load"


def test_kvm_takes_and_gives_back_the_converted_state():
    """The converted state loaded into KVM's in-kernel devices, read back, converted again."""
    if not accel.probe("kvm").usable:
        pytest.skip(f"kvm not usable here: {accel.probe('kvm').reason}")
    from pyvmm.accel import kvm

    clock = Clock()
    chip = programmed_chip(clock)
    platform, pages = kvmstate.to_kvm(chip)
    with kvm.KvmVm() as vm:
        vcpus = [vm.create_vcpu(i) for i in range(2)]
        vm.restore_platform_state(platform)
        for vcpu, page in zip(vcpus, pages):
            vcpu.set_lapic(page)
        saved = vm.save_platform_state()
        back = [vcpu.get_lapic() for vcpu in vcpus]
        for vcpu in vcpus:
            vcpu.close()
    again = Irqchip(2, clock=clock)
    kvmstate.load_from_kvm(again, saved, back)
    assert_same_devices(chip, again, seconds=0.01)  # KVM's timers ran while the test talked to it
