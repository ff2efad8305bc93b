"""The IOAPIC programmed as Linux's setup_IO_APIC does it, delivering into the local APICs."""

import pytest

from pyvmm.accel.irqchip import ISA_IRQ_TO_IOAPIC_PIN, Irqchip

IOAPIC = 0xFEC00000
LAPIC = 0xFEE00000
EOI, SVR, LDR, DFR, TPR, ISR, TMR, IRR = 0xB0, 0xF0, 0xD0, 0xE0, 0x80, 0x100, 0x180, 0x200


class FakeClock:
    def __init__(self, now=10.0):
        self.now = now

    def __call__(self):
        return self.now


def ioapic_read(chip, index):
    chip.mmio_write(0, IOAPIC, 4, index)
    return chip.mmio_read(0, IOAPIC + 0x10, 4)


def ioapic_write(chip, index, value):
    chip.mmio_write(0, IOAPIC, 4, index)
    chip.mmio_write(0, IOAPIC + 0x10, 4, value)


def route(chip, pin, vector, *, dest, logical=False, level=False, masked=False, mode=0):
    """ioapic_write_entry(): the high word first, then the low word."""
    low = vector | mode << 8 | (0x800 if logical else 0) | (0x8000 if level else 0) | (0x10000 if masked else 0)
    ioapic_write(chip, 0x11 + 2 * pin, dest << 24)
    ioapic_write(chip, 0x10 + 2 * pin, low)


def lapic_write(chip, cpu, reg, value):
    chip.mmio_write(cpu, LAPIC + reg, 4, value)


def lapic_read(chip, cpu, reg):
    return chip.mmio_read(cpu, LAPIC + reg, 4)


def setup_local_apic(chip, cpu):
    """The parts of Linux's setup_local_APIC() that routing depends on (flat logical mode)."""
    lapic_write(chip, cpu, DFR, 0xFFFFFFFF)
    lapic_write(chip, cpu, LDR, (1 << cpu) << 24)
    lapic_write(chip, cpu, TPR, 0)
    lapic_write(chip, cpu, SVR, 0x1FF)
    lapic_write(chip, cpu, 0x350, 0x10700)  # LINT0 masked: the IOAPIC takes over


def bit(chip, cpu, bank, vector):
    return bool(lapic_read(chip, cpu, bank + 0x10 * (vector // 32)) & (1 << (vector % 32)))


@pytest.fixture
def woken():
    return []


@pytest.fixture
def chip(woken):
    chip = Irqchip(2, clock=FakeClock(), wake=woken.append)
    setup_local_apic(chip, 0)
    setup_local_apic(chip, 1)
    return chip


def test_identification_registers(chip):
    assert ioapic_read(chip, 0x01) == 0x00170011
    assert ioapic_read(chip, 0x00) == 2 << 24 == chip.ioapic_id << 24  # clear of APIC IDs 0 and 1
    ioapic_write(chip, 0x00, 0x0F000000 | 0x123)
    assert ioapic_read(chip, 0x00) == 0x0F000000
    assert ioapic_read(chip, 0x10) == 0x10000  # pins come up masked
    # a byte write of IOREGSEL (some guests do) selects too
    chip.mmio_write(0, IOAPIC, 1, 0x01)
    assert chip.mmio_read(0, IOAPIC, 4) == 0x01
    assert chip.mmio_read(0, IOAPIC + 0x10, 2) == 0x0011


def test_isa_irq0_is_pin2():
    assert ISA_IRQ_TO_IOAPIC_PIN[0] == 2
    assert 2 not in ISA_IRQ_TO_IOAPIC_PIN
    assert all(ISA_IRQ_TO_IOAPIC_PIN[irq] == irq for irq in range(1, 16) if irq != 2)


def test_edge_irq_to_physical_destination(chip, woken):
    route(chip, 4, 0x24, dest=1)  # COM1, physical APIC ID 1
    woken.clear()
    chip.set_irq_line(4, True)
    chip.set_irq_line(4, False)
    assert woken == [1]
    assert not chip.has_interrupt(0)
    assert chip.has_interrupt(1)
    assert not bit(chip, 1, TMR, 0x24)
    assert chip.ack_interrupt(1) == 0x24
    assert bit(chip, 1, ISR, 0x24) and not bit(chip, 1, IRR, 0x24)
    lapic_write(chip, 1, EOI, 0)
    assert not bit(chip, 1, ISR, 0x24)
    # the held level of an edge pin does not re-deliver; a new edge does
    chip.set_irq_line(4, True)
    assert chip.ack_interrupt(1) == 0x24
    chip.set_irq_line(4, True)
    assert not chip.has_interrupt(1)


def test_level_irq_remote_irr_and_redelivery_on_eoi(chip, woken):
    route(chip, 10, 0x3A, dest=0x02, logical=True, level=True)  # flat logical: CPU 1
    chip.set_irq_line(10, True)
    assert ioapic_read(chip, 0x10 + 2 * 10) & (1 << 14)  # Remote IRR
    assert chip.ack_interrupt(1) == 0x3A
    assert bit(chip, 1, TMR, 0x3A)
    woken.clear()
    lapic_write(chip, 1, EOI, 0)  # the device still asserts the line: delivered again
    assert woken == [1]
    assert chip.ack_interrupt(1) == 0x3A
    chip.set_irq_line(10, False)  # the handler quietened the device
    lapic_write(chip, 1, EOI, 0)
    assert not ioapic_read(chip, 0x10 + 2 * 10) & (1 << 14)
    assert not chip.has_interrupt(1)
    chip.set_irq_line(10, True)
    assert chip.ack_interrupt(1) == 0x3A


def test_level_irq_waits_for_remote_irr(chip):
    route(chip, 11, 0x3B, dest=0, level=True)
    chip.set_irq_line(11, True)
    assert chip.ack_interrupt(0) == 0x3B
    chip.set_irq_line(11, False)
    chip.set_irq_line(11, True)  # a new assertion before the EOI is held
    assert not chip.has_interrupt(0)
    lapic_write(chip, 0, EOI, 0)
    assert chip.ack_interrupt(0) == 0x3B


def test_masked_pins(chip):
    route(chip, 5, 0x25, dest=0, masked=True)
    chip.set_irq_line(5, True)
    chip.set_irq_line(5, False)
    route(chip, 5, 0x25, dest=0)
    assert not chip.has_interrupt(0)  # an edge on a masked pin is lost
    route(chip, 9, 0x29, dest=0, level=True, masked=True)
    chip.set_irq_line(9, True)
    assert not chip.has_interrupt(0)
    route(chip, 9, 0x29, dest=0, level=True)  # unmasking a still-asserted level pin delivers it
    assert chip.ack_interrupt(0) == 0x29


def test_gsi_above_15_is_ioapic_only(chip):
    route(chip, 20, 0x50, dest=0, level=True)
    chip.set_irq_line(20, True)
    assert chip.ack_interrupt(0) == 0x50


def test_unaccepted_level_message_does_not_set_remote_irr(chip):
    route(chip, 7, 0x27, dest=5, level=True)  # no APIC has ID 5
    chip.set_irq_line(7, True)
    assert not ioapic_read(chip, 0x10 + 2 * 7) & (1 << 14)
    route(chip, 7, 0x27, dest=0, level=True)
    assert chip.ack_interrupt(0) == 0x27


def test_lowest_priority_picks_the_lower_tpr(chip):
    route(chip, 6, 0x46, dest=0x03, logical=True, mode=1)
    lapic_write(chip, 0, TPR, 0x30)
    chip.set_irq_line(6, True)
    chip.set_irq_line(6, False)
    assert not chip.has_interrupt(0)
    assert chip.ack_interrupt(1) == 0x46
    lapic_write(chip, 1, EOI, 0)
    lapic_write(chip, 1, TPR, 0x40)
    chip.set_irq_line(6, True)
    chip.set_irq_line(6, False)
    assert chip.ack_interrupt(0) == 0x46


def test_nmi_delivery_mode(chip):
    route(chip, 3, 0, dest=0, mode=4)
    chip.set_irq_line(3, True)
    assert chip.has_nmi(0) and not chip.has_interrupt(0)
    assert chip.ack_nmi(0) is True
    assert chip.ack_nmi(0) is False


def test_pit_through_pin2(chip):
    clock = chip.clock
    route(chip, 2, 0x30, dest=0x01, logical=True)
    chip.pio_write(0, 0x21, 1, 0xFF)  # the PIC masks everything
    chip.pio_write(0, 0x43, 1, 0x34)
    chip.pio_write(0, 0x40, 1, 0xA9)
    chip.pio_write(0, 0x40, 1, 0x04)  # 1193: ~1 kHz
    due = chip.next_deadline(0)
    assert due is not None and chip.next_deadline(1) is None
    clock.now = due + 1e-7
    chip.poll()
    assert chip.ack_interrupt(0) == 0x30


def test_extint_delivery_mode_fetches_the_vector_from_the_pic(chip):
    for port, value in ((0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01), (0x21, 0xF7)):
        chip.pio_write(0, port, 1, value)  # PIC initialised, IRQ3 unmasked
    route(chip, 3, 0, dest=1, mode=7)  # pin 3 as ExtINT to CPU 1 (whose LINT0 is masked)
    chip.set_irq_line(3, True)
    assert chip.has_interrupt(1)
    assert chip.ack_interrupt(1) == 0x33
    assert not chip.has_interrupt(1)


def test_pit_also_reaches_pin0_for_identity_routed_tables():
    # pyvmm's MP table and MADT route ISA IRQ0 to pin 0 (no override), as KVM does
    clock = FakeClock()
    chip = Irqchip(1, clock=clock)
    setup_local_apic(chip, 0)
    route(chip, 0, 0x30, dest=0)
    route(chip, 2, 0x31, dest=0, masked=True)  # IRQ2 (cascade) in such a table: left masked
    chip.pio_write(0, 0x21, 1, 0xFF)
    chip.pio_write(0, 0x43, 1, 0x34)
    chip.pio_write(0, 0x40, 1, 0xA9)
    chip.pio_write(0, 0x40, 1, 0x04)
    clock.now = chip.next_deadline(0) + 1e-7
    chip.poll()
    assert chip.ack_interrupt(0) == 0x30
    assert not chip.has_interrupt(0)


def test_owed_pit_ticks_through_the_ioapic(chip):
    clock = chip.clock
    route(chip, 2, 0x30, dest=0x01, logical=True)
    chip.pio_write(0, 0x21, 1, 0xFF)
    chip.pio_write(0, 0x43, 1, 0x34)
    chip.pio_write(0, 0x40, 1, 0xA9)
    chip.pio_write(0, 0x40, 1, 0x04)  # 1193 input clocks per tick
    clock.now += 3.5 * 1193 / 1_193_182  # three ticks due, polled late once
    chip.poll()
    taken = 0
    while chip.ack_interrupt(0) == 0x30:
        taken += 1
        lapic_write(chip, 0, EOI, 0)
    assert taken == 3
