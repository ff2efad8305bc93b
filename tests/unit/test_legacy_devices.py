"""i8042, debug exit, POST code port and CMOS, driven through the port bus as a guest would."""

import calendar
import logging

import pytest

from pyvmm.devices.irq import IrqLine
from pyvmm.devices.legacy import Cmos, DebugExit, I8042, PostCode
from pyvmm.errors import PyvmmError
from pyvmm.vmm import layout
from pyvmm.vmm.bus import PioBus

MiB, GiB = layout.MiB, layout.GiB


class Ports:
    """A PIO bus with in/out helpers."""

    def __init__(self):
        self.bus = PioBus()

    def inb(self, port: int) -> int:
        data = memoryview(bytearray(1))
        self.bus.read(port, data)
        return data[0]

    def outb(self, port: int, value: int) -> None:
        self.bus.write(port, bytes((value,)))


class ExitRecorder:
    def __init__(self):
        self.calls: list[tuple[int, str]] = []

    def __call__(self, status: int, reason: str) -> None:
        self.calls.append((status, reason))


# ---------------------------------------------------------------- i8042

DATA, STATUS = 0x60, 0x64
OBF, AUXDATA = 0x01, 0x20


class Keyboard(Ports):
    """The controller as the builder inserts it: two one-port ranges."""

    def __init__(self):
        super().__init__()
        self.exits = ExitRecorder()
        self.edges = 0
        self.irq = IrqLine(layout.IRQ_KEYBOARD, self._irq_changed)
        self.i8042 = I8042(self.exits, self.irq)
        self.bus.insert(self.i8042.data_port, layout.PORT_I8042, 1)
        self.bus.insert(self.i8042.command_port, layout.PORT_I8042 + 4, 1)
        self.polls = 0  # status reads spent waiting, as Linux's i8042_wait_read counts them

    def _irq_changed(self, irq: int, level: bool) -> None:
        if level:
            self.edges += 1

    # Linux's __i8042_command(): command, parameters, then results.
    def command(self, command: int, params=(), results: int = 0, aux_loop: bool = False):
        assert not self.inb(STATUS) & 0x02  # IBF clear: ready for a write
        self.outb(STATUS, command)
        for param in params:
            assert not self.inb(STATUS) & 0x02
            self.outb(DATA, param)
        out = []
        for _ in range(results):
            if not self.wait_read():
                return None  # timeout
            if aux_loop and not self.inb(STATUS) & AUXDATA:
                return -1  # Linux: "auxerr", the byte is left unread
            out.append(self.inb(DATA))
        return out

    def wait_read(self, limit: int = 10) -> bool:
        for _ in range(limit):
            if self.inb(STATUS) & OBF:
                return True
            self.polls += 1
        return False

    def flush(self) -> list[int]:
        flushed = []
        while self.inb(STATUS) & OBF:
            flushed.append(self.inb(DATA))
        return flushed


@pytest.fixture
def kbd():
    return Keyboard()


def test_i8042_self_test_and_interface_test(kbd):
    assert kbd.command(0xAA, results=1) == [0x55]
    assert kbd.inb(STATUS) & 0x04  # SYS flag after self-test
    assert kbd.command(0xAB, results=1) == [0x00]
    assert not kbd.inb(STATUS) & OBF


def test_i8042_status_register_bits(kbd):
    status = kbd.inb(STATUS)
    assert status & 0x02 == 0  # IBF never set
    assert status & 0x10  # keylock: not inhibited (Linux warns otherwise)
    assert not status & OBF
    kbd.outb(STATUS, 0x20)
    status = kbd.inb(STATUS)
    assert status & OBF and status & 0x08  # output full; last write was a command
    ctr = kbd.inb(DATA)
    assert not kbd.inb(STATUS) & OBF
    assert kbd.inb(DATA) == ctr  # an empty output register reads its stale byte


def test_i8042_command_byte_round_trip(kbd):
    (initial,) = kbd.command(0x20, results=1)
    assert initial & 0x40  # translation on, as a BIOS leaves it
    assert kbd.command(0x60, params=[0x31]) == []
    assert kbd.command(0x20, results=1) == [0x31]
    # 0xAD / 0xAE flip the keyboard-disable bit of the command byte
    kbd.command(0xAE)
    assert kbd.command(0x20, results=1) == [0x21]
    kbd.command(0xAD)
    assert kbd.command(0x20, results=1) == [0x31]
    kbd.command(0xA8)
    assert kbd.command(0x20, results=1) == [0x11]
    kbd.command(0xA7)
    assert kbd.command(0x20, results=1) == [0x31]


def test_i8042_pulse_reset_requests_exit(kbd):
    kbd.outb(STATUS, 0xFE)
    assert kbd.exits.calls == [(0, "reset")]
    kbd.outb(STATUS, 0xFF)  # pulses no line
    assert kbd.exits.calls == [(0, "reset")]


def test_i8042_output_port_reset_line(kbd):
    kbd.command(0xD1, params=[0x03])
    assert kbd.exits.calls == []
    kbd.command(0xD1, params=[0x02])  # reset line driven low
    assert kbd.exits.calls == [(0, "reset")]


def test_i8042_keyboard_reset_ack_sequence(kbd):
    kbd.command(0x60, params=[0x45])  # keyboard enabled, IRQ on, translated
    edges = kbd.edges
    kbd.outb(DATA, 0xFF)
    replies = []
    while kbd.wait_read(limit=1):
        assert not kbd.inb(STATUS) & AUXDATA
        replies.append(kbd.inb(DATA))
    assert replies == [0xFA, 0xAA]
    assert kbd.edges - edges == 2  # one IRQ 1 edge per byte
    assert not kbd.irq.level


def test_i8042_keyboard_bytes_wait_while_interface_disabled(kbd):
    kbd.command(0x60, params=[0x55])  # KBDDIS set
    kbd.outb(DATA, 0xF5)
    assert not kbd.inb(STATUS) & OBF
    kbd.command(0xAE)
    assert kbd.inb(STATUS) & OBF
    assert kbd.inb(DATA) == 0xFA


def interrupt_driven_ps2_command(kbd: Keyboard, command: int, params=(), replies: int = 0):
    """libps2's ps2_command() over i8042_kbd_write(), with i8042_interrupt() run on each IRQ 1 edge."""
    received = []
    for byte in (command, *params):
        edges = kbd.edges
        kbd.outb(DATA, byte)
        assert kbd.edges > edges, f"no IRQ 1 for the ACK of {byte:#04x}"
        status = kbd.inb(STATUS)
        assert status & OBF and not status & AUXDATA
        assert kbd.inb(DATA) == 0xFA
    for _ in range(replies):
        if not kbd.inb(STATUS) & OBF:
            break
        assert kbd.irq.level  # each reply raised IRQ 1 again after the previous read
        received.append(kbd.inb(DATA))
    return received


def test_linux_i8042_and_atkbd_probe_finish_without_timeouts(kbd):
    # i8042_controller_check / selftest / init
    kbd.flush()
    assert kbd.command(0xAA, results=1) == [0x55]
    ctr = [kbd.command(0x20, results=1)[0] for _ in range(2)]
    assert ctr[0] == ctr[1]
    ctr = (ctr[0] | 0x10) & ~0x01
    kbd.command(0x60, params=[ctr])
    kbd.flush()
    # i8042_check_aux(): the AUX loopback fails at once, the AUX test reports
    # an error, so Linux concludes there is no AUX port.
    kbd.flush()
    assert kbd.command(0xD3, params=[0x5A], results=1, aux_loop=True) == -1
    (aux_test,) = kbd.command(0xA9, results=1)
    assert aux_test not in (0x00, 0xFA, 0xFF)
    # i8042_setup_kbd(): enable the port with its interrupt
    ctr = (ctr & ~0x10) | 0x01
    kbd.command(0x60, params=[ctr])
    kbd.flush()
    # atkbd_probe(): reset, get ID, deactivate; atkbd_connect later enables
    assert interrupt_driven_ps2_command(kbd, 0xFF, replies=1) == [0xAA]
    ident = interrupt_driven_ps2_command(kbd, 0xF2, replies=2)
    assert ident == [0xAB, 0x41]  # MF2 keyboard, translated ID
    interrupt_driven_ps2_command(kbd, 0xF5)
    interrupt_driven_ps2_command(kbd, 0xED, params=[0x00])  # LEDs
    interrupt_driven_ps2_command(kbd, 0xF3, params=[0x00])  # typematic
    interrupt_driven_ps2_command(kbd, 0xF4)
    assert kbd.polls == 0  # every reply was there on the first status read
    assert not kbd.inb(STATUS) & OBF


def test_i8042_untranslated_id_and_scancode_set(kbd):
    kbd.command(0x60, params=[0x05])  # translation off
    assert interrupt_driven_ps2_command(kbd, 0xF2, replies=2) == [0xAB, 0x83]
    assert interrupt_driven_ps2_command(kbd, 0xF0, params=[0x00], replies=1) == [0x02]
    interrupt_driven_ps2_command(kbd, 0xF0, params=[0x03])
    assert interrupt_driven_ps2_command(kbd, 0xF0, params=[0x00], replies=1) == [0x03]


def test_i8042_as_one_range_at_0x60():
    ports = Ports()
    exits = ExitRecorder()
    ports.bus.insert(I8042(exits), 0x60, 5)
    ports.outb(0x64, 0xAA)
    assert ports.inb(0x64) & OBF
    assert ports.inb(0x60) == 0x55
    assert ports.inb(0x61) == 0xFF  # not the controller's
    ports.outb(0x64, 0xFE)
    assert exits.calls == [(0, "reset")]


# ----------------------------------------------------------- debug exit


def test_debug_exit_status_value():
    ports = Ports()
    exits = ExitRecorder()
    ports.bus.insert(DebugExit(exits), layout.PORT_DEBUG_EXIT, 1)
    assert ports.inb(layout.PORT_DEBUG_EXIT) == 0xFF
    ports.outb(layout.PORT_DEBUG_EXIT, 0x2A)
    assert exits.calls == [(42, "debug-exit")]
    ports.outb(layout.PORT_DEBUG_EXIT, 0)
    assert exits.calls[-1] == (0, "debug-exit")


# ------------------------------------------------------------ POST code


def test_post_code_logging_and_bounded_list(caplog):
    now = [100.0]
    post = PostCode(clock=lambda: now[0])
    ports = Ports()
    ports.bus.insert(post, layout.PORT_POST, 1)
    caplog.set_level(logging.DEBUG, logger="pyvmm.post")
    now[0] = 100.0125
    ports.outb(layout.PORT_POST, 0x3C)
    assert ports.inb(layout.PORT_POST) == 0x3C
    first = caplog.records[0]
    assert first.levelno == logging.INFO
    assert "0x3c" in first.getMessage() and "12.500 ms" in first.getMessage()
    assert post.codes[0] == (pytest.approx(12.5), 0x3C)

    for i in range(1, 2000):
        ports.outb(layout.PORT_POST, i & 0xFF)
    assert post.count == 2000
    assert len(post.codes) == 1024
    assert [value for _, value in post.codes][-3:] == [1997 & 0xFF, 1998 & 0xFF, 1999 & 0xFF]
    assert ports.inb(layout.PORT_POST) == 1999 & 0xFF
    code_records = [r for r in caplog.records if r.getMessage().startswith("POST code 0x")]
    assert len(code_records) == 2000
    assert all(r.levelno == logging.INFO for r in code_records[:64])
    assert all(r.levelno == logging.DEBUG for r in code_records[64:])


# ----------------------------------------------------------------- CMOS

INDEX, CMOS_DATA = 0x70, 0x71
FIXED = calendar.timegm((2026, 11, 23, 18, 4, 59))  # a Monday, 6:04:59 pm UTC


class Rtc(Ports):
    def __init__(self, memory_size: int = 128 * MiB, clock=lambda: FIXED + 0.25):
        super().__init__()
        self.cmos = Cmos(memory_size, clock=clock)
        self.bus.insert(self.cmos, layout.PORT_CMOS, 2)

    def read(self, index: int) -> int:
        self.outb(INDEX, index)
        return self.inb(CMOS_DATA)

    def write(self, index: int, value: int) -> None:
        self.outb(INDEX, index)
        self.outb(CMOS_DATA, value)


def test_cmos_time_fields_bcd_24h():
    rtc = Rtc()
    assert rtc.read(0x0B) == 0x02  # 24 h, BCD
    assert [rtc.read(i) for i in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)] == [
        0x59, 0x04, 0x18, 0x02, 0x23, 0x11, 0x26, 0x20,
    ]


def test_cmos_time_fields_binary_and_12h():
    rtc = Rtc()
    rtc.write(0x0B, 0x04 | 0x02)  # binary, 24 h
    assert [rtc.read(i) for i in (0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32)] == [59, 4, 18, 23, 11, 26, 20]
    rtc.write(0x0B, 0x04)  # binary, 12 h
    assert rtc.read(0x04) == 0x80 | 6
    rtc.write(0x0B, 0x00)  # BCD, 12 h
    assert rtc.read(0x04) == 0x80 | 0x06


def test_cmos_nmi_bit_masked_off_index():
    rtc = Rtc()
    rtc.outb(INDEX, 0x80 | 0x00)
    assert rtc.inb(CMOS_DATA) == 0x59  # seconds, not register 0x80
    assert rtc.cmos.nmi_disabled
    rtc.outb(INDEX, 0x80 | 0x40)
    rtc.outb(CMOS_DATA, 0x77)
    rtc.outb(INDEX, 0x40)
    assert rtc.inb(CMOS_DATA) == 0x77
    assert not rtc.cmos.nmi_disabled


def test_cmos_memory_size_128_mib():
    rtc = Rtc(128 * MiB)
    word = lambda lo: rtc.read(lo) | rtc.read(lo + 1) << 8
    assert word(0x15) == 640
    assert word(0x17) == 0xFFFF  # 127 MiB in KiB does not fit: capped
    assert word(0x30) == 0xFFFF
    assert word(0x34) == (128 - 16) * MiB // 0x10000
    assert [rtc.read(i) for i in (0x5B, 0x5C, 0x5D)] == [0, 0, 0]


def test_cmos_memory_size_small_and_6_gib():
    small = Rtc(32 * MiB)
    assert small.read(0x17) | small.read(0x18) << 8 == 31 * 1024
    assert small.read(0x34) | small.read(0x35) << 8 == 16 * MiB // 0x10000
    rtc = Rtc(6 * GiB)
    assert rtc.read(0x34) | rtc.read(0x35) << 8 == (layout.MMIO_GAP_START - 16 * MiB) // 0x10000
    above_4g = rtc.read(0x5B) | rtc.read(0x5C) << 8 | rtc.read(0x5D) << 16
    assert above_4g == (6 * GiB - layout.MMIO_GAP_START) // 0x10000 == 0xC000


def test_cmos_registers_a_c_d():
    rtc = Rtc()
    assert rtc.read(0x0A) & 0x70 == 0x20  # 32.768 kHz divider
    assert rtc.read(0x0D) == 0x80  # valid RAM and time
    assert rtc.read(0x0C) == 0x00
    rtc.write(0x0A, 0xA6)
    assert rtc.read(0x0A) == 0x26  # UIP is read-only


def test_cmos_uip_is_brief_and_read_loops_terminate():
    now = [FIXED + 0.9999]  # inside the update window
    rtc = Rtc(clock=lambda: now[0])
    assert rtc.read(0x0A) & 0x80
    # A clock that does not move must not hold UIP forever.
    assert not rtc.read(0x0A) & 0x80
    # A real clock leaves the window within 244 us.
    now[0] = FIXED + 1.0001
    assert not rtc.read(0x0A) & 0x80
    assert rtc.read(0x00) == 0x00  # 18:05:00


def test_cmos_set_bit_freezes_clock_and_guest_sets_time():
    now = [FIXED + 0.5]
    rtc = Rtc(clock=lambda: now[0])
    # Linux's mc146818_set_time(): SET, divider reset, write fields, restore.
    control = rtc.read(0x0B)
    rtc.write(0x0B, control | 0x80)
    freq = rtc.read(0x0A)
    rtc.write(0x0A, freq | 0x60)
    now[0] += 10
    assert rtc.read(0x00) == 0x59  # frozen
    for index, value in ((0x09, 0x30), (0x08, 0x01), (0x07, 0x02), (0x04, 0x03), (0x02, 0x04), (0x00, 0x05)):
        rtc.write(index, value)
    rtc.write(0x0B, control)
    assert rtc.read(0x00) == 0x05  # still held by the divider reset
    rtc.write(0x0A, freq)
    assert [rtc.read(i) for i in (0x09, 0x08, 0x07, 0x04, 0x02, 0x00)] == [0x30, 0x01, 0x02, 0x03, 0x04, 0x05]
    now[0] += 61
    assert [rtc.read(i) for i in (0x04, 0x02, 0x00)] == [0x03, 0x05, 0x06]
    assert rtc.read(0x06) == 0x04  # 2030-01-02 is a Wednesday


def test_cmos_invalid_memory_size_is_a_clear_error():
    with pytest.raises(PyvmmError, match="cmos: memory_size"):
        Cmos(0)


def test_i8042_ctrl_alt_del_from_the_host_in_the_guests_scan_code_set(kbd):
    """SendCtrlAltDel (Firecracker's action): set 1 while the controller translates (a BIOS's and
    Linux's setting), set 2 when the guest turned translation off; nothing when it disabled the keyboard."""
    assert kbd.i8042.press_ctrl_alt_del()
    assert kbd.edges == 1
    received = [kbd.inb(DATA) for _ in range(len(I8042.CTRL_ALT_DEL_SET1))]
    assert bytes(received) == I8042.CTRL_ALT_DEL_SET1 and not kbd.inb(STATUS) & OBF
    kbd.command(0x60, params=[0x01])  # keyboard interrupt on, translation off
    assert kbd.i8042.press_ctrl_alt_del()
    assert bytes(kbd.inb(DATA) for _ in range(len(I8042.CTRL_ALT_DEL_SET2))) == I8042.CTRL_ALT_DEL_SET2
    kbd.command(0xAD)  # keyboard disabled
    assert not kbd.i8042.press_ctrl_alt_del()
