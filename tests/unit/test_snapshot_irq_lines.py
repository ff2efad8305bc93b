"""A restored device's interrupt line agrees with the restored interrupt controller.

The IRQ line object (devices/irq.py) is wiring, made fresh by a restore, and believes its
line low; the controller's state comes back from the snapshot with the line as it was.
When they disagree, the device's next "line low" is never sent, the controller keeps its
input high, and the following rising edge (an edge-triggered IOAPIC pin: ISA IRQ 4 for
the UART) is lost for good.
"""

from __future__ import annotations

from types import SimpleNamespace

from pyvmm import plainstate
from pyvmm.accel.irqchip import Irqchip, persist
from pyvmm.devices.irq import IrqLine
from pyvmm.devices.legacy.cmos import Cmos
from pyvmm.devices.legacy.i8042 import I8042
from pyvmm.devices.legacy.post import PostCode
from pyvmm.devices.legacy.serial import Serial
from pyvmm.vmm.snapshot import LEGACY_DEVICES, restore_devices

IOAPIC = 0xFEC00000
UART_IRQ, UART_VECTOR = 4, 0x23
THR, IER, IIR = 0, 1, 2
IER_THRI = 0x02


def _machine(chip: Irqchip):
    """A chip with IRQ 4 routed as Linux routes it (edge, vector 0x23, to vCPU 0) and the legacy devices."""
    chip.mmio_write(0, 0xFEE00350, 4, 0x10700)  # LINT0 masked: the IOAPIC, not the 8259, delivers
    chip.mmio_write(0, IOAPIC, 4, 0x10 + 2 * UART_IRQ)
    chip.mmio_write(0, IOAPIC + 0x10, 4, UART_VECTOR)
    devices = {"serial": Serial(IrqLine(UART_IRQ, chip.set_irq_line), lambda data: None),
               "i8042": I8042(lambda code, reason: None), "cmos": Cmos(64 << 20), "post": PostCode()}  # fmt: skip
    return SimpleNamespace(devices=devices, virtio=[])


def _taken(chip: Irqchip) -> bool:
    """The UART's vector was delivered (acknowledged and ended, as the guest's handler does)."""
    if not chip.has_interrupt(0):
        return False
    assert chip.ack_interrupt(0) == UART_VECTOR
    chip.mmio_write(0, 0xFEE000B0, 4, 0)
    return True


def test_a_restored_uart_raises_its_next_interrupt():
    chip = Irqchip(1)
    machine = _machine(chip)
    serial = machine.devices["serial"]
    serial.write(IER, bytes([IER_THRI]))  # transmitter empty: the line goes high
    assert _taken(chip)
    # paused and snapshotted here, the UART still asking for its interrupt (the line high)
    state = {"devices": {name: plainstate.capture(machine.devices[name]) for name in LEGACY_DEVICES}, "virtio": []}
    saved_chip = persist.save(chip)

    chip = Irqchip(1)
    persist.restore(chip, saved_chip)
    machine = _machine(chip)
    restore_devices(machine, state, "test")
    serial = machine.devices["serial"]
    data = bytearray(1)
    serial.read(IIR, memoryview(data))  # the handler reads IIR: the THR-empty interrupt is taken, the line falls
    assert data[0] & 0x0F == 0x02
    assert not _taken(chip)
    serial.write(THR, b"x")  # a byte out, the transmitter empty again: a new rising edge
    assert _taken(chip), "the UART's interrupt after the restore was lost"
