"""The 8259A programmable interrupt controller pair of a PC (master + slave on IRQ2), with ELCR.

Sans-IO and lock-free: the owning ``Irqchip`` serialises every call. The model
follows the 8259A datasheet as PCs use it: ICW1-ICW4 initialisation, OCW1 mask,
OCW2 EOI/rotation commands, OCW3 IRR/ISR read select and special mask, auto-EOI,
special fully nested mode on the master, spurious IRQ7/IRQ15, and the EISA edge/level
control registers (ELCR, ports 0x4D0/0x4D1) that replace ICW1's LTIM bit on PCs.

Edge-triggered inputs latch into IRR on a rising edge and stay latched until
acknowledged, even if the line drops again (a ``pulse()`` from a device is not lost).
"""

from __future__ import annotations

MASTER_CMD, MASTER_DATA = 0x20, 0x21
SLAVE_CMD, SLAVE_DATA = 0xA0, 0xA1
ELCR_MASTER, ELCR_SLAVE = 0x4D0, 0x4D1
PIC_PORTS = frozenset((MASTER_CMD, MASTER_DATA, SLAVE_CMD, SLAVE_DATA, ELCR_MASTER, ELCR_SLAVE))
CASCADE_IRQ = 2

# IRQ0 (PIT), 1 (keyboard), 2 (cascade) and 8 (RTC), 13 (FPU) are always edge-triggered on PCs.
ELCR_WRITABLE = (0xF8, 0xDE)


class Pic8259:
    """One 8259A chip."""

    def __init__(self, elcr_writable: int):
        self.elcr_writable = elcr_writable
        self.elcr = 0
        self.last_irr = 0  # input line levels, for edge detection
        self.slave_master = False  # True on the master of a cascade
        self.irr = 0
        self.reset()

    def reset(self) -> None:
        """ICW1 state: masks, ISR and rotation cleared; pending level requests survive."""
        self.irr &= self.elcr
        self.imr = 0
        self.isr = 0
        self.priority_add = 0  # the IRQ with the highest priority (rotation)
        self.irq_base = 0
        self.read_isr = False  # OCW3 RR/RIS: which register a command-port read returns
        self.poll = False
        self.special_mask = False
        self.init_state = 0  # 0 = operational; 1..3 = expecting ICW2..ICW4
        self.init4 = False
        self.single_mode = False
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.special_fully_nested = False

    # --- inputs ----------------------------------------------------------
    def set_input(self, irq: int, level: bool) -> None:
        mask = 1 << irq
        if self.elcr & mask:  # level-sensitive: IRR follows the line
            if level:
                self.irr |= mask
                self.last_irr |= mask
            else:
                self.irr &= ~mask
                self.last_irr &= ~mask
        elif level:
            if not self.last_irr & mask:
                self.irr |= mask
            self.last_irr |= mask
        else:
            self.last_irr &= ~mask

    # --- priority resolution -------------------------------------------------
    def _highest(self, mask: int) -> int:
        """Priority rank (0 = highest) of the highest-priority bit set in ``mask``, or 8."""
        if not mask:
            return 8
        rank = 0
        while not mask & (1 << ((rank + self.priority_add) & 7)):
            rank += 1
        return rank

    def pending_irq(self) -> int:
        """The IRQ this chip asserts INT for, or -1."""
        rank = self._highest(self.irr & ~self.imr)
        if rank == 8:
            return -1
        isr = self.isr
        if self.special_mask:
            isr &= ~self.imr  # special mask mode: masked in-service levels do not block
        if self.special_fully_nested and self.slave_master:
            isr &= ~(1 << CASCADE_IRQ)  # more slave interrupts may nest on IR2
        in_service_rank = self._highest(isr)
        if rank < in_service_rank:
            return (rank + self.priority_add) & 7
        return -1

    def acknowledge(self, irq: int) -> None:
        """INTA for ``irq``: move it to ISR (unless auto-EOI), drop an edge request."""
        mask = 1 << irq
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= mask
        if not self.elcr & mask:
            self.irr &= ~mask

    # --- guest access ------------------------------------------------------
    def write(self, a0: int, value: int) -> None:
        if a0 == 0:
            if value & 0x10:  # ICW1
                self.reset()
                self.init_state = 1
                self.init4 = bool(value & 1)
                self.single_mode = bool(value & 2)
                # LTIM (bit 3) is ignored: PCs select edge/level per line with the ELCR.
            elif value & 0x08:  # OCW3
                if value & 0x04:
                    self.poll = True
                if value & 0x02:
                    self.read_isr = bool(value & 1)
                if value & 0x40:
                    self.special_mask = bool(value & 0x20)
            else:  # OCW2
                self._ocw2(value)
            return
        if self.init_state == 0:  # OCW1
            self.imr = value
        elif self.init_state == 1:  # ICW2
            self.irq_base = value & 0xF8
            self.init_state = 2 if not self.single_mode else (3 if self.init4 else 0)
        elif self.init_state == 2:  # ICW3 (cascade wiring is fixed on a PC)
            self.init_state = 3 if self.init4 else 0
        else:  # ICW4
            self.special_fully_nested = bool(value & 0x10)
            self.auto_eoi = bool(value & 0x02)
            self.init_state = 0

    def _ocw2(self, value: int) -> None:
        command = value >> 5
        if command in (0, 4):  # clear / set rotate in auto-EOI mode
            self.rotate_on_auto_eoi = command == 4
        elif command in (1, 5):  # non-specific EOI (5: and rotate)
            rank = self._highest(self.isr)
            if rank != 8:
                irq = (rank + self.priority_add) & 7
                self.isr &= ~(1 << irq)
                if command == 5:
                    self.priority_add = (irq + 1) & 7
        elif command in (3, 7):  # specific EOI (7: and rotate)
            irq = value & 7
            self.isr &= ~(1 << irq)
            if command == 7:
                self.priority_add = (irq + 1) & 7
        elif command == 6:  # set priority: the given IRQ becomes the lowest
            self.priority_add = ((value & 7) + 1) & 7
        # command 2 is a no-op

    def read(self, a0: int) -> int:
        if a0 == 0:
            return self.isr if self.read_isr else self.irr
        return self.imr


class DualPic:
    """Master and slave 8259A cascaded on master IRQ2, as on every PC."""

    def __init__(self) -> None:
        self.master = Pic8259(ELCR_WRITABLE[0])
        self.slave = Pic8259(ELCR_WRITABLE[1])
        self.master.slave_master = True
        self.output = False  # the master's INT pin
        self.last_irq = -1  # the ISA IRQ the last acknowledge delivered (-1: spurious)

    def _update(self) -> None:
        self.master.set_input(CASCADE_IRQ, self.slave.pending_irq() >= 0)
        self.output = self.master.pending_irq() >= 0

    def set_irq(self, irq: int, level: bool) -> None:
        """Drive ISA IRQ ``irq`` (0-15; 2 is the cascade and must not be driven by devices)."""
        if irq < 8:
            self.master.set_input(irq, level)
        else:
            self.slave.set_input(irq - 8, level)
        self._update()

    def acknowledge(self) -> int:
        """The INTA cycle: the vector to run now (IRQ7/IRQ15's vector if the request vanished)."""
        irq = self.master.pending_irq()
        self.last_irq = -1
        if irq < 0:
            vector = self.master.irq_base + 7  # spurious IRQ7, ISR untouched
        elif irq == CASCADE_IRQ:
            self.master.acknowledge(irq)
            slave_irq = self.slave.pending_irq()
            if slave_irq >= 0:
                self.slave.acknowledge(slave_irq)
                vector = self.slave.irq_base + slave_irq
                self.last_irq = 8 + slave_irq
            else:
                vector = self.slave.irq_base + 7  # spurious IRQ15
        else:
            self.master.acknowledge(irq)
            vector = self.master.irq_base + irq
            self.last_irq = irq
        self._update()
        return vector

    def _poll_read(self, chip: Pic8259) -> int:
        """OCW3 poll command: the next read returns 0x80 | IRQ and acknowledges it."""
        chip.poll = False
        irq = chip.pending_irq()
        if irq < 0:
            return 0
        chip.acknowledge(irq)
        self._update()
        return 0x80 | irq

    def read_port(self, port: int) -> int:
        if port == ELCR_MASTER:
            return self.master.elcr
        if port == ELCR_SLAVE:
            return self.slave.elcr
        chip = self.master if port < 0x80 else self.slave
        if chip.poll:
            return self._poll_read(chip)
        return chip.read(port & 1)

    def write_port(self, port: int, value: int) -> None:
        if port in (ELCR_MASTER, ELCR_SLAVE):
            chip = self.master if port == ELCR_MASTER else self.slave
            chip.elcr = value & chip.elcr_writable
            # a line switched to level keeps its current request; one switched to edge keeps IRR
        else:
            chip = self.master if port < 0x80 else self.slave
            chip.write(port & 1, value)
        self._update()
