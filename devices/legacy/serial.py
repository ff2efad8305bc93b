"""A 16550A UART (COM1) as Linux's 8250 driver probes and drives it.

Sans-IO: the device only reacts to register accesses and to
``enqueue_input``; it owns no thread or timer. Transmission is instantaneous:
a byte written to THR goes to ``output`` at once, so THRE and TEMT are always
set and the "THR empty" interrupt re-arms after every THR write.

Interrupt sources, highest priority first (IIR bits 3..1):
  line status (OE)        0b011  cleared by reading LSR
  RX data / RX timeout    0b010 / 0b110  cleared by draining RBR below trigger / empty
  THR empty               0b001  cleared by reading IIR while it is the reported
                                  source, or by writing THR; set again by a THR
                                  write or an IER write that enables it
  modem status            0b000  cleared by reading MSR
With FIFOs on, data below the trigger level is reported as an RX timeout at
once (hardware waits four character times; no timer exists here).

The IRQ output is not gated by MCR.OUT2: QEMU and Firecracker do not gate it
either, and guests written for them rely on that.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable

from pyvmm.devices.irq import IrqLine
from pyvmm.errors import DeviceError

# register offsets
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01  # RX data available
IER_THRI = 0x02  # THR empty
IER_RLSI = 0x04  # line status
IER_MSI = 0x08  # modem status

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_RX_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
RX_TRIGGER_LEVELS = (1, 4, 8, 14)  # FCR bits 7..6

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

HW_FIFO_SIZE = 16  # what the guest can hold in loopback, as on the chip
DEFAULT_DIVISOR = 0x0C  # 9600 baud, the usual firmware setting
# Host input waiting for the guest: large enough to paste a screenful while the
# guest is busy, bounded so a stalled guest cannot grow the VMM without limit.
DEFAULT_INPUT_LIMIT = 64 * 1024


class Serial:
    """COM1 registers at offsets 0..7 of its port range (insert at ``layout.PORT_COM1``, size 8)."""

    def __init__(self, irq: IrqLine, output: Callable[[bytes], None], *, input_limit: int = DEFAULT_INPUT_LIMIT):
        if input_limit < 1:
            raise DeviceError(f"serial: input_limit must be at least 1 byte, not {input_limit}")
        self.irq = irq
        self.output = output
        self.input_limit = input_limit
        # Guest register accesses come from vCPU threads, host input from a
        # reader thread: one lock keeps registers, FIFO and IRQ level consistent.
        self._lock = threading.Lock()
        self._rx: collections.deque[int] = collections.deque()
        self.divisor = DEFAULT_DIVISOR
        self.ier = 0
        self.lcr = 0x03  # 8N1
        self.mcr = MCR_OUT2
        self.scr = 0
        self.fifo_enabled = False
        self.rx_trigger = 1
        self._overrun = False  # LSR.OE, cleared by reading LSR
        self._thr_pending = False  # THR-empty interrupt condition
        self._msr_deltas = 0
        self._msr_inputs = self._modem_inputs()
        self.bytes_dropped = 0  # host input lost to a full buffer

    # ---- bus interface -------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        if not len(data):
            return
        with self._lock:
            value = self._read_register(offset)
            self._update_irq()
        # Linux only makes byte accesses; a wider one reads the byte at offset.
        data[0] = value
        if len(data) > 1:
            data[1:] = bytes(len(data) - 1)

    def write(self, offset: int, data) -> None:
        if not len(data):
            return
        with self._lock:
            self._write_register(offset, data[0])
            self._update_irq()

    # ---- host side -----------------------------------------------------

    def enqueue_input(self, data: bytes) -> None:
        """Bytes typed on the host; safe to call from any thread.

        Bytes beyond ``input_limit`` waiting bytes are dropped and the guest
        sees an overrun (LSR.OE), as a real UART whose FIFO is full.
        """
        if not data:
            return
        with self._lock:
            room = self.input_limit - len(self._rx)
            if room < len(data):
                self.bytes_dropped += len(data) - max(room, 0)
                self._overrun = True
                data = data[: max(room, 0)]
            self._rx.extend(data)
            self._update_irq()

    @property
    def pending_input(self) -> int:
        """Bytes received but not yet read by the guest."""
        with self._lock:
            return len(self._rx)

    # ---- registers -----------------------------------------------------

    def _read_register(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self.divisor & 0xFF
            return self._rx.popleft() if self._rx else 0
        if offset == IER_DLM:
            return (self.divisor >> 8) if dlab else self.ier
        if offset == IIR_FCR:
            # 16550A: IIR is readable whatever DLAB says (Linux relies on it
            # when it probes for EFR with LCR = 0xBF).
            source = self._interrupt_source()
            if source == IIR_THRI:
                self._thr_pending = False
            fifo_bits = IIR_FIFO_ENABLED if self.fifo_enabled else 0
            return fifo_bits | (IIR_NO_INT if source is None else source)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            value = LSR_THRE | LSR_TEMT
            if self._rx:
                value |= LSR_DR
            if self._overrun:
                value |= LSR_OE
                self._overrun = False
            return value
        if offset == MSR:
            self._refresh_modem_inputs()
            value = self._msr_inputs | self._msr_deltas
            self._msr_deltas = 0
            return value
        if offset == SCR:
            return self.scr
        return 0xFF

    def _write_register(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif offset == IER_DLM:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
            else:
                old = self.ier
                # Bits 7..4 do not exist on a 16550A: Linux's XScale (IER.UUE)
                # probe must read them back as 0.
                self.ier = value & 0x0F
                if self.ier & IER_THRI and not old & IER_THRI:
                    # Enabling the THRE interrupt while THR is empty raises it;
                    # Linux's startup checks this (UART_BUG_THRE).
                    self._thr_pending = True
        elif offset == IIR_FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
            self._refresh_modem_inputs()
        elif offset == SCR:
            self.scr = value
        # LSR and MSR writes (factory test) are ignored.

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE)
        if enable != self.fifo_enabled:
            # Switching FIFO mode on or off empties both FIFOs.
            self._rx.clear()
        self.fifo_enabled = enable
        if not enable:
            return  # the other FCR bits only act with FIFOs enabled
        if value & FCR_CLEAR_RX:
            self._rx.clear()
        # FCR_CLEAR_TX: the transmitter is always empty here.
        self.rx_trigger = RX_TRIGGER_LEVELS[value >> 6]

    def _transmit(self, value: int) -> None:
        if self.mcr & MCR_LOOP:
            # Loopback: the transmitter feeds the receiver, the line stays idle.
            capacity = HW_FIFO_SIZE if self.fifo_enabled else 1
            if len(self._rx) < capacity:
                self._rx.append(value)
            else:
                self._overrun = True
        else:
            self.output(bytes((value,)))
        # The byte leaves at once, so THR is empty again.
        self._thr_pending = True

    # ---- modem lines ---------------------------------------------------

    def _modem_inputs(self) -> int:
        if self.mcr & MCR_LOOP:
            # Loopback wires the outputs to the inputs: RTS->CTS, DTR->DSR,
            # OUT1->RI, OUT2->DCD. Linux's autoconfig checks MSR = 0x90 for
            # MCR = LOOP|OUT2|RTS.
            value = 0
            if self.mcr & MCR_RTS:
                value |= MSR_CTS
            if self.mcr & MCR_DTR:
                value |= MSR_DSR
            if self.mcr & MCR_OUT1:
                value |= MSR_RI
            if self.mcr & MCR_OUT2:
                value |= MSR_DCD
            return value
        # A terminal is always attached: carrier, DSR and CTS up, so getty
        # and flow control proceed.
        return MSR_CTS | MSR_DSR | MSR_DCD

    def _refresh_modem_inputs(self) -> None:
        new = self._modem_inputs()
        changed = new ^ self._msr_inputs
        if changed & MSR_CTS:
            self._msr_deltas |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_deltas |= MSR_DDSR
        if changed & MSR_DCD:
            self._msr_deltas |= MSR_DDCD
        if self._msr_inputs & MSR_RI and not new & MSR_RI:
            self._msr_deltas |= MSR_TERI  # trailing edge of RI only
        self._msr_inputs = new

    # ---- interrupts ----------------------------------------------------

    def _interrupt_source(self) -> int | None:
        if self.ier & IER_RLSI and self._overrun:
            return IIR_RLSI
        if self.ier & IER_RDI and self._rx:
            if self.fifo_enabled and len(self._rx) < self.rx_trigger:
                return IIR_RX_TIMEOUT
            return IIR_RDI
        if self.ier & IER_THRI and self._thr_pending:
            return IIR_THRI
        if self.ier & IER_MSI and self._msr_deltas:
            return IIR_MSI
        return None

    def _update_irq(self) -> None:
        self.irq.set_level(self._interrupt_source() is not None)

    def resync_irq(self) -> None:
        """After a restore: send the IRQ level the registers give, whatever the new line object believes."""
        with self._lock:
            self.irq.resync(self._interrupt_source() is not None)
