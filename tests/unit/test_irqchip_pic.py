"""The 8259 pair driven as Linux's arch/x86/kernel/i8259.c drives it, through the Irqchip."""

import pytest

from pyvmm.accel.irqchip import Irqchip, IrqchipError


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def out(chip, port, value):
    chip.pio_write(0, port, 1, value)


def inb(chip, port):
    return chip.pio_read(0, port, 1)


def init_8259a(chip, auto_eoi=False):
    """Linux's init_8259A(): vectors 0x30-0x3F, cascade on IR2."""
    out(chip, 0x21, 0xFF)
    out(chip, 0x20, 0x11)  # ICW1: edge, cascade, ICW4 needed
    out(chip, 0x21, 0x30)  # ICW2: ISA_IRQ_VECTOR(0)
    out(chip, 0x21, 0x04)  # ICW3: slave on IR2
    out(chip, 0x21, 0x03 if auto_eoi else 0x01)  # ICW4: 8086 mode (+AEOI)
    out(chip, 0xA0, 0x11)
    out(chip, 0xA1, 0x38)
    out(chip, 0xA1, 0x02)
    out(chip, 0xA1, 0x01)
    out(chip, 0x21, 0xFB)  # everything masked but the cascade
    out(chip, 0xA1, 0xFF)


def unmask(chip, irq):
    port = 0x21 if irq < 8 else 0xA1
    out(chip, port, inb(chip, port) & ~(1 << (irq & 7)))


def mask_and_ack(chip, irq):
    """Linux's mask_and_ack_8259A(): specific EOIs (slave first, then the cascade)."""
    if irq < 8:
        out(chip, 0x20, 0x60 + irq)
    else:
        out(chip, 0xA0, 0x60 + (irq & 7))
        out(chip, 0x20, 0x62)


@pytest.fixture
def chip():
    return Irqchip(2, clock=FakeClock())


def test_probe_reads_back_the_mask(chip):
    # probe_8259A(): mask the slave, write 0xA5 to the master IMR, read it back
    out(chip, 0xA1, 0xFF)
    out(chip, 0x21, 0xA5)
    assert inb(chip, 0x21) == 0xA5
    assert inb(chip, 0xA1) == 0xFF


def test_extint_virtual_wire_delivers_to_bsp_only(chip):
    woken = []
    chip = Irqchip(2, clock=FakeClock(), wake=woken.append)
    init_8259a(chip)
    unmask(chip, 4)
    assert not chip.has_interrupt(0)
    chip.set_irq_line(4, True)
    assert woken == [0]  # the BSP's LINT0 is ExtINT (firmware hand-off); the AP's is masked
    assert chip.has_interrupt(0) and not chip.has_interrupt(1)
    assert chip.ack_interrupt(0) == 0x34
    # in service now: IRR clear (edge), ISR bit 4 set, nothing more pending
    out(chip, 0x20, 0x0B)
    assert inb(chip, 0x20) == 0x10
    out(chip, 0x20, 0x0A)
    assert inb(chip, 0x20) == 0x00
    assert not chip.has_interrupt(0)
    chip.set_irq_line(4, False)
    mask_and_ack(chip, 4)
    out(chip, 0x20, 0x0B)
    assert inb(chip, 0x20) == 0


def test_masked_line_is_held_in_irr_until_unmasked(chip):
    init_8259a(chip)
    chip.set_irq_line(3, True)
    chip.set_irq_line(3, False)  # an edge pulse while masked
    assert not chip.has_interrupt(0)
    out(chip, 0x20, 0x0A)
    assert inb(chip, 0x20) == 0x08
    unmask(chip, 3)
    assert chip.ack_interrupt(0) == 0x33


def test_priority_and_nesting(chip):
    init_8259a(chip)
    for irq in (1, 3, 4):
        unmask(chip, irq)
    chip.set_irq_line(4, True)
    assert chip.ack_interrupt(0) == 0x34
    chip.set_irq_line(3, True)  # higher priority than 4: nests
    assert chip.ack_interrupt(0) == 0x33
    chip.set_irq_line(1, True)
    assert chip.ack_interrupt(0) == 0x31
    out(chip, 0x20, 0x20)  # non-specific EOI ends the highest in service: IRQ1
    out(chip, 0x20, 0x0B)
    assert inb(chip, 0x20) == 0x18
    out(chip, 0x20, 0x63)  # specific EOI for IRQ3
    assert inb(chip, 0x20) == 0x10


def test_lower_priority_waits_for_eoi(chip):
    init_8259a(chip)
    unmask(chip, 3)
    unmask(chip, 4)
    chip.set_irq_line(3, True)
    assert chip.ack_interrupt(0) == 0x33
    chip.set_irq_line(4, True)
    assert not chip.has_interrupt(0)  # IRQ3 in service blocks IRQ4
    mask_and_ack(chip, 3)
    assert chip.ack_interrupt(0) == 0x34


def test_slave_irq_through_cascade(chip):
    init_8259a(chip)
    unmask(chip, 12)
    chip.set_irq_line(12, True)
    assert chip.has_interrupt(0)
    assert chip.ack_interrupt(0) == 0x3C
    out(chip, 0xA0, 0x0B)
    assert inb(chip, 0xA0) == 0x10
    out(chip, 0x20, 0x0B)
    assert inb(chip, 0x20) == 0x04  # the cascade input is in service on the master
    chip.set_irq_line(12, False)
    mask_and_ack(chip, 12)
    assert inb(chip, 0xA0) == 0 and inb(chip, 0x20) == 0


def test_spurious_irq7_when_request_vanished(chip):
    init_8259a(chip)
    out(chip, 0x4D0, 0x20)  # IRQ5 level-triggered
    unmask(chip, 5)
    chip.set_irq_line(5, True)
    assert chip.has_interrupt(0)
    chip.set_irq_line(5, False)  # the level line dropped before INTA
    assert not chip.has_interrupt(0)
    # an INTA that still happens (the CPU had already committed) yields IRQ7's vector, ISR untouched
    assert chip.pic.acknowledge() == 0x37
    out(chip, 0x20, 0x0B)
    assert inb(chip, 0x20) == 0


def test_elcr_level_line_redelivers_after_eoi(chip):
    init_8259a(chip)
    out(chip, 0x4D1, 0x04)  # IRQ10 level
    assert inb(chip, 0x4D1) == 0x04
    out(chip, 0x4D0, 0xFF)
    assert inb(chip, 0x4D0) == 0xF8  # IRQ0-2 cannot be level-triggered
    unmask(chip, 10)
    chip.set_irq_line(10, True)
    assert chip.ack_interrupt(0) == 0x3A
    mask_and_ack(chip, 10)
    assert chip.ack_interrupt(0) == 0x3A  # still asserted: requested again
    chip.set_irq_line(10, False)
    mask_and_ack(chip, 10)
    assert not chip.has_interrupt(0)


def test_auto_eoi_leaves_isr_clear(chip):
    init_8259a(chip, auto_eoi=True)
    unmask(chip, 1)
    chip.set_irq_line(1, True)
    assert chip.ack_interrupt(0) == 0x31
    out(chip, 0x20, 0x0B)
    assert inb(chip, 0x20) == 0
    chip.set_irq_line(1, False)
    chip.set_irq_line(1, True)
    assert chip.ack_interrupt(0) == 0x31  # no EOI needed before the next one


def test_lint0_masked_stops_pic_delivery(chip):
    init_8259a(chip)
    unmask(chip, 4)
    chip.mmio_write(0, 0xFEE00350, 4, 0x10700)  # mask LINT0 (Linux does so once the IOAPIC is in use)
    chip.set_irq_line(4, True)
    assert not chip.has_interrupt(0)
    assert chip.ack_interrupt(0) is None
    chip.mmio_write(0, 0xFEE00350, 4, 0x700)
    assert chip.ack_interrupt(0) == 0x34


def test_irq2_and_out_of_range_lines_are_rejected(chip):
    with pytest.raises(IrqchipError, match="IRQ 2"):
        chip.set_irq_line(2, True)
    with pytest.raises(IrqchipError, match="IRQ 24"):
        chip.set_irq_line(24, True)
    with pytest.raises(IrqchipError, match="port 0x3f8"):
        chip.pio_read(0, 0x3F8, 1)
