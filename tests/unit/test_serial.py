"""The 16550A model, driven through the port bus exactly as a guest driver drives it."""

import threading

import pytest

from pyvmm.devices.irq import IrqLine
from pyvmm.devices.legacy.serial import Serial
from pyvmm.vmm import layout
from pyvmm.vmm.bus import PioBus

COM1 = layout.PORT_COM1
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7


class Guest:
    """A UART behind a PIO bus, with a recording IRQ line."""

    def __init__(self, **kwargs):
        self.output = bytearray()
        self.irq_events: list[tuple[int, bool]] = []
        self.irq = IrqLine(layout.IRQ_COM1, lambda irq, level: self.irq_events.append((irq, level)))
        self.uart = Serial(self.irq, self.output.extend, **kwargs)
        self.bus = PioBus()
        self.bus.insert(self.uart, COM1, 8)

    def inb(self, reg: int) -> int:
        data = memoryview(bytearray(1))
        self.bus.read(COM1 + reg, data)
        return data[0]

    def outb(self, reg: int, value: int) -> None:
        self.bus.write(COM1 + reg, bytes((value,)))

    @property
    def irq_level(self) -> bool:
        return self.irq.level


@pytest.fixture
def guest():
    return Guest()


def test_thr_bytes_go_to_output(guest):
    for byte in b"Hello\n":
        assert guest.inb(LSR) & 0x20  # THRE: ready for the next byte
        guest.outb(THR, byte)
    assert bytes(guest.output) == b"Hello\n"


def test_divisor_latch_round_trip_and_dlab_hides_data_registers(guest):
    guest.outb(IER, 0x05)
    guest.outb(LCR, 0x83)  # DLAB + 8N1
    guest.outb(DLL, 0x01)
    guest.outb(DLM, 0x02)
    assert guest.inb(DLL) == 0x01
    assert guest.inb(DLM) == 0x02
    guest.outb(LCR, 0x03)
    assert guest.inb(LCR) == 0x03
    assert guest.inb(IER) == 0x05  # IER was not touched by the DLM write
    assert guest.uart.divisor == 0x0201
    assert bytes(guest.output) == b""  # the DLL write was not transmitted


def test_scratch_register(guest):
    for value in (0xA5, 0x5A, 0x00):
        guest.outb(SCR, value)
        assert guest.inb(SCR) == value


def test_lsr_dr_thre_temt(guest):
    assert guest.inb(LSR) == 0x60  # THRE | TEMT, no data
    guest.uart.enqueue_input(b"ab")
    assert guest.inb(LSR) == 0x61
    assert guest.inb(RBR) == ord("a")
    assert guest.inb(LSR) & 0x01
    assert guest.inb(RBR) == ord("b")
    assert guest.inb(LSR) == 0x60  # DR cleared once the FIFO is empty


def test_loopback_tx_to_rx_and_mcr_to_msr(guest):
    assert guest.inb(MSR) & 0xF0 == 0xB0  # DCD, DSR, CTS up with a terminal attached
    guest.outb(FCR, 0x07)
    guest.outb(MCR, 0x10)  # loopback, all outputs off
    assert guest.inb(MSR) & 0xF0 == 0x00
    for mcr_bit, msr_bit in ((0x01, 0x20), (0x02, 0x10), (0x04, 0x40), (0x08, 0x80)):
        guest.outb(MCR, 0x10 | mcr_bit)
        assert guest.inb(MSR) & 0xF0 == msr_bit
    guest.outb(MCR, 0x10 | 0x08)
    guest.outb(THR, 0x42)
    guest.outb(THR, 0x43)
    assert bytes(guest.output) == b""  # nothing reaches the line in loopback
    assert guest.inb(LSR) & 0x01
    assert guest.inb(RBR) == 0x42
    assert guest.inb(RBR) == 0x43
    assert not guest.inb(LSR) & 0x01
    guest.outb(MCR, 0x0B)
    guest.outb(THR, ord("x"))
    assert bytes(guest.output) == b"x"


def test_msr_delta_bits_set_on_change_and_cleared_by_read(guest):
    guest.inb(MSR)
    guest.outb(MCR, 0x10 | 0x04)  # loopback: CTS, DSR, DCD drop; RI (OUT1) rises
    msr = guest.inb(MSR)
    assert msr & 0x0F == 0x01 | 0x02 | 0x08  # DCTS, DDSR, DDCD (RI only flags its trailing edge)
    assert guest.inb(MSR) & 0x0F == 0
    guest.outb(MCR, 0x10)  # RI falls
    assert guest.inb(MSR) & 0x0F == 0x04  # TERI


def test_modem_status_interrupt(guest):
    guest.inb(MSR)
    guest.outb(IER, 0x08)
    assert not guest.irq_level
    guest.outb(MCR, 0x10 | 0x02)
    assert guest.irq_level
    assert guest.inb(IIR) == 0x00  # modem status is the source
    guest.inb(MSR)
    assert not guest.irq_level
    assert guest.inb(IIR) == 0x01


def test_iir_priorities_and_thre_cleared_by_iir_read(guest):
    guest.outb(FCR, 0x01)  # FIFOs on, trigger 1 byte
    guest.inb(MSR)
    guest.outb(MCR, 0x10 | 0x02)  # loopback: a modem-status change is pending
    guest.outb(IER, 0x0F)
    # THR empty outranks modem status.
    assert guest.inb(IIR) == 0xC2
    # Reading IIR while THRE is the reported cause clears it; modem status shows next.
    assert guest.inb(IIR) == 0xC0
    guest.inb(MSR)
    assert guest.inb(IIR) == 0xC1
    # Receive data outranks THR empty.
    guest.outb(THR, 0x11)  # loopback: RX data, and THRE re-armed
    assert guest.inb(IIR) == 0xC4
    # Line status (overrun) outranks receive data: overflow the 16-byte loopback FIFO.
    for value in range(16):
        guest.outb(THR, value)
    assert guest.inb(IIR) == 0xC6
    assert guest.inb(LSR) & 0x02  # OE; the read clears it
    assert guest.inb(IIR) == 0xC4
    while guest.inb(LSR) & 0x01:
        guest.inb(RBR)
    assert guest.inb(IIR) == 0xC2  # only THR empty is left
    assert guest.inb(IIR) == 0xC1


def test_thre_rearmed_by_thr_write_and_by_ier_enable(guest):
    guest.outb(IER, 0x02)
    assert guest.irq_level
    assert guest.inb(IIR) == 0x02
    assert not guest.irq_level
    assert guest.inb(IIR) == 0x01
    guest.outb(THR, ord("a"))
    assert guest.irq_level
    assert guest.inb(IIR) == 0x02
    # Linux's startup THRE test: disable, re-enable, and expect it again.
    guest.outb(IER, 0x00)
    assert not guest.irq_level
    guest.outb(IER, 0x02)
    assert guest.inb(IIR) == 0x02


def test_rx_interrupt_level_on_irq_line(guest):
    guest.outb(IER, 0x01)
    assert guest.irq_events == []
    guest.uart.enqueue_input(b"xy")
    assert guest.irq_events == [(layout.IRQ_COM1, True)]
    assert guest.inb(IIR) == 0x04
    guest.inb(RBR)
    assert guest.irq_level  # still data
    guest.inb(RBR)
    assert guest.irq_events == [(layout.IRQ_COM1, True), (layout.IRQ_COM1, False)]
    guest.outb(IER, 0x00)
    guest.uart.enqueue_input(b"z")
    assert not guest.irq_level  # masked by IER
    guest.outb(IER, 0x01)
    assert guest.irq_level


def test_rx_trigger_level_and_timeout_identification(guest):
    guest.outb(FCR, 0x81)  # FIFOs on, trigger level 8
    guest.outb(IER, 0x01)
    guest.uart.enqueue_input(b"1234")
    assert guest.inb(IIR) == 0xCC  # below the trigger: character timeout
    guest.uart.enqueue_input(b"5678")
    assert guest.inb(IIR) == 0xC4  # trigger level reached


def test_fcr_clears_rx_fifo(guest):
    guest.outb(FCR, 0x01)
    guest.uart.enqueue_input(b"stale")
    assert guest.inb(LSR) & 0x01
    guest.outb(FCR, 0x03)  # clear RX
    assert not guest.inb(LSR) & 0x01
    assert guest.uart.pending_input == 0
    guest.uart.enqueue_input(b"q")
    guest.outb(FCR, 0x00)  # leaving FIFO mode empties the FIFOs too
    assert not guest.inb(LSR) & 0x01
    assert guest.inb(IIR) & 0xC0 == 0


def test_input_overflow_drops_bytes_and_sets_oe():
    guest = Guest(input_limit=8)
    guest.outb(IER, 0x05)
    guest.uart.enqueue_input(b"0123456789AB")
    assert guest.uart.bytes_dropped == 4
    assert guest.inb(IIR) == 0x06  # line status first
    lsr = guest.inb(LSR)
    assert lsr & 0x03 == 0x03  # DR and OE
    assert not guest.inb(LSR) & 0x02  # OE cleared by reading LSR
    received = bytearray()
    while guest.inb(LSR) & 0x01:
        received.append(guest.inb(RBR))
    assert bytes(received) == b"01234567"


def test_enqueue_from_another_thread_is_safe(guest):
    guest.outb(FCR, 0x07)
    guest.outb(IER, 0x01)
    chunks = [bytes([i % 256]) * 7 for i in range(300)]
    expected = b"".join(chunks)
    received = bytearray()

    def reader_thread():
        for chunk in chunks:
            guest.uart.enqueue_input(chunk)

    thread = threading.Thread(target=reader_thread)
    thread.start()
    while len(received) < len(expected):
        if guest.inb(LSR) & 0x01:
            received.append(guest.inb(RBR))
        elif not thread.is_alive() and not guest.inb(LSR) & 0x01:
            break
    thread.join()
    assert bytes(received) == expected
    assert not guest.irq_level  # FIFO drained: the RX interrupt is down


def test_wide_access_reads_one_byte(guest):
    guest.outb(SCR, 0x77)
    data = memoryview(bytearray(b"\xAA\xAA"))
    guest.bus.read(COM1 + SCR, data)
    assert bytes(data) == b"\x77\x00"
    guest.bus.write(COM1 + THR, b"AB")
    assert bytes(guest.output) == b"A"


def linux_autoconfig(guest: Guest) -> str:
    """Replays drivers/tty/serial/8250/8250_port.c autoconfig() and
    autoconfig_16550a() for a legacy ISA port (no UPF_SKIP_TEST, no Exar),
    including size_fifo(); returns the port type it would choose."""
    inb, outb = guest.inb, guest.outb
    # IER existence test
    scratch = inb(IER)
    outb(IER, 0)
    scratch2 = inb(IER) & 0x0F
    outb(IER, 0x0F)
    scratch3 = inb(IER) & 0x0F
    outb(IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "none (IER test)"
    save_mcr = inb(MCR)
    save_lcr = inb(LCR)
    # loopback test
    outb(MCR, 0x10 | 0x0A)
    status1 = inb(MSR) & 0xF0
    outb(MCR, save_mcr)
    if status1 != 0x90:
        return "none (LOOP test)"
    # EFR (same slot as FCR) reset, then the FIFO bits of IIR
    outb(LCR, 0xBF)
    outb(2, 0)
    outb(LCR, 0)
    outb(FCR, 0x01)
    kind = inb(IIR) >> 6
    if kind == 0:
        port = "8250/16450"
    elif kind == 1:
        port = "unknown"
    elif kind == 2:
        port = "16550"
    else:
        port = autoconfig_16550a(guest)
    outb(LCR, save_lcr)
    # reset the UART
    outb(MCR, save_mcr)
    outb(FCR, 0x01)
    outb(FCR, 0x07)
    outb(FCR, 0x00)
    inb(RBR)
    outb(IER, 0)
    return port


def autoconfig_16550a(guest: Guest) -> str:
    inb, outb = guest.inb, guest.outb
    # EFR with DLAB set: only ST16C650V1 has it
    outb(LCR, 0x80)
    if inb(2) == 0:
        return "16650 (EFRv1)"
    outb(LCR, 0xBF)
    if inb(2) == 0:
        return "16650V2 (EFRv2)"
    # National Semiconductor SuperIO
    outb(LCR, 0)
    status1 = inb(MCR)
    outb(LCR, 0xE0)
    status2 = inb(2)
    if not (status2 ^ status1) & 0x10:
        outb(LCR, 0)
        outb(MCR, status1 ^ 0x10)
        outb(LCR, 0xE0)
        status2 = inb(2)
        outb(LCR, 0)
        outb(MCR, status1)
        if (status2 ^ status1) & 0x10:
            return "NS16550A"
    # TI16750: IIR bit 5 with 64-byte FIFO mode
    outb(LCR, 0)
    outb(FCR, 0x01 | 0x20)
    status1 = inb(IIR) >> 5
    outb(FCR, 0x01)
    outb(LCR, 0x80)
    outb(FCR, 0x01 | 0x20)
    status2 = inb(IIR) >> 5
    outb(FCR, 0x01)
    outb(LCR, 0)
    if status1 == 6 and status2 == 7:
        return "16750"
    # XScale: IER bit 6 (UUE) sticks
    iersave = inb(IER)
    outb(IER, iersave & ~0x40)
    if not inb(IER) & 0x40:
        outb(IER, iersave | 0x40)
        if inb(IER) & 0x40:
            return "XScale"
    outb(IER, iersave)
    if size_fifo(guest) == 64:
        return "U6_16550A"
    return "16550A"


def size_fifo(guest: Guest) -> int:
    inb, outb = guest.inb, guest.outb
    old_lcr = inb(LCR)
    outb(LCR, 0)
    old_fcr = inb(FCR)  # reads IIR, as Linux does
    old_mcr = inb(MCR)
    outb(FCR, 0x07)
    outb(MCR, 0x10)
    outb(LCR, 0x80)
    old_dl = inb(DLL) | inb(DLM) << 8
    outb(DLL, 1)
    outb(DLM, 0)
    outb(LCR, 0x03)
    for count in range(256):
        outb(THR, count)
    count = 0
    while inb(LSR) & 0x01 and count < 256:
        inb(RBR)
        count += 1
    outb(FCR, old_fcr)
    outb(MCR, old_mcr)
    outb(LCR, 0x80)
    outb(DLL, old_dl & 0xFF)
    outb(DLM, old_dl >> 8)
    outb(LCR, old_lcr)
    return count


def test_linux_autoconfig_detects_16550a(guest):
    assert linux_autoconfig(guest) == "16550A"
    assert size_fifo(guest) == 16
    # FIFOs on: IIR shows the FIFO bits 0xC0.
    guest.outb(FCR, 0x01)
    assert guest.inb(IIR) & 0xC0 == 0xC0
    # Nothing leaked to the console, and the port still works afterwards.
    assert bytes(guest.output) == b""
    guest.outb(THR, ord("k"))
    assert bytes(guest.output) == b"k"


def test_linux_startup_interrupt_tests(guest):
    """serial8250_do_startup(): neither UART_BUG_THRE nor UART_BUG_TXEN is detected."""
    guest.outb(FCR, 0x07)
    assert guest.inb(LSR) != 0xFF
    guest.outb(LCR, 0x03)
    guest.outb(MCR, 0x0B)
    # THRE re-assert test
    guest.outb(IER, 0x02)
    iir1 = guest.inb(IIR)
    guest.outb(IER, 0)
    guest.outb(IER, 0x02)
    iir = guest.inb(IIR)
    guest.outb(IER, 0)
    assert not iir1 & 0x01 and not iir & 0x01
    # TX-enable test
    guest.outb(IER, 0x02)
    lsr = guest.inb(LSR)
    iir = guest.inb(IIR)
    guest.outb(IER, 0)
    assert lsr & 0x40 and not iir & 0x01


def test_invalid_input_limit_is_a_clear_error():
    from pyvmm.errors import PyvmmError

    with pytest.raises(PyvmmError, match="serial: input_limit"):
        Serial(IrqLine(4, lambda irq, level: None), lambda data: None, input_limit=0)
