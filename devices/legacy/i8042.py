"""The i8042 keyboard controller with a PS/2 keyboard and no AUX (mouse) port.

A PC needs it for two things: Linux's i8042 and atkbd drivers probe it at
boot, and "reboot" pulses the CPU reset line through it (command 0xFE). The
model answers every command the probes send at once, so no probe waits for a
timeout.

Ports: 0x60 is the data port, 0x64 the status (read) / command (write) port.
0x61..0x63 belong to other devices (0x61 is the PC speaker / NMI status port,
which KVM's in-kernel PIT may own), so the controller is inserted as two
one-port ranges: ``i8042.data_port`` at 0x60 and ``i8042.command_port`` at
0x64. ``I8042`` itself also works as one device inserted at 0x60 with size 5
(offset 0 = data, offset 4 = command; offsets 1..3 read 0xFF).

"No AUX" is presented the way Linux's ``i8042_check_aux()`` recognises it
without waiting: the AUX loopback command (0xD3) echoes its byte as keyboard
data (an AT-style controller; Linux wants the AUX-data status bit), and the
AUX interface test (0xA9) reports a stuck clock line.

Model of the output buffer: the controller has one output register (status
OBF); the keyboard keeps its own queue of bytes and hands the next one over
when the register is empty and its interface is enabled, as a real keyboard
waits while the controller inhibits its clock.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

from pyvmm.devices.irq import IrqLine

log = logging.getLogger("pyvmm.i8042")

# status register
STATUS_OBF = 0x01  # output buffer full
STATUS_IBF = 0x02  # input buffer full (never: writes are consumed at once)
STATUS_SYS = 0x04  # system flag: self-test passed
STATUS_CMD = 0x08  # last write went to the command port
STATUS_UNLOCKED = 0x10  # keyboard not inhibited by the keylock switch
STATUS_AUXDATA = 0x20  # output byte came from the AUX port

# controller command byte (CTR)
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
# As a BIOS leaves it: translation on, keyboard interrupt on, POST passed, no AUX.
INITIAL_CTR = CTR_XLATE | CTR_AUXDIS | CTR_SYS | CTR_KBDINT

# controller commands (written to 0x64)
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_INPUT_PORT = 0xC0
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_KBD_OUTPUT = 0xD2
CMD_WRITE_AUX_OUTPUT = 0xD3  # "AUX loopback"
CMD_WRITE_AUX = 0xD4
CMD_PULSE_RESET = 0xFE

SELF_TEST_OK = 0x55
INTERFACE_OK = 0x00
AUX_CLOCK_STUCK_LOW = 0x01

OUTPUT_PORT_RESET = 0x01  # CPU reset line, active low
OUTPUT_PORT_A20 = 0x02

# keyboard commands and replies
KBD_ACK = 0xFA
KBD_RESEND = 0xFE
KBD_BAT_OK = 0xAA
KBD_ECHO = 0xEE
KBD_SET_LEDS = 0xED
KBD_SCANCODE_SET = 0xF0
KBD_GET_ID = 0xF2
KBD_SET_TYPEMATIC = 0xF3
KBD_ENABLE = 0xF4
KBD_DISABLE = 0xF5
KBD_SET_DEFAULT = 0xF6
KBD_RESET = 0xFF
KBD_ID = (0xAB, 0x83)  # MF2 keyboard; 0x83 reads as 0x41 through translation
KBD_ID_TRANSLATED = (0xAB, 0x41)
TRANSLATED_SET_NUMBER = {1: 0x43, 2: 0x41, 3: 0x3F}
AUX_NO_DEVICE = 0xFE  # what a controller returns for a byte sent to an absent mouse

KEYBOARD_QUEUE_LIMIT = 16  # a PS/2 keyboard's own buffer


class _Port:
    """One of the controller's two ports as a one-port bus device."""

    def __init__(self, controller: "I8042", offset: int):
        self._controller = controller
        self._offset = offset

    def read(self, offset: int, data: memoryview) -> None:
        self._controller.read(self._offset, data)

    def write(self, offset: int, data) -> None:
        self._controller.write(self._offset, data)


class I8042:
    DATA = 0
    COMMAND = 4

    def __init__(self, request_exit: Callable[[int, str], None], irq_kbd: IrqLine | None = None):
        self.request_exit = request_exit
        self.irq_kbd = irq_kbd
        self.data_port = _Port(self, self.DATA)
        self.command_port = _Port(self, self.COMMAND)
        self._lock = threading.Lock()
        self.ctr = INITIAL_CTR
        self.ram = bytearray(32)  # controller RAM; byte 0 is the CTR
        self.output_port = OUTPUT_PORT_RESET | OUTPUT_PORT_A20
        self._output: int | None = None  # the output register (None: empty)
        self._last_output = 0  # what a read of an empty register returns
        self._output_aux = False
        self._last_write_was_command = False
        self._pending_command: int | None = None  # a command waiting for its data byte
        # keyboard state
        self._keyboard: collections.deque[int] = collections.deque()
        self._keyboard_pending: int | None = None  # keyboard command waiting for its argument
        self.scanning = True
        self.scancode_set = 2
        self.leds = 0

    # ---- bus interface -------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        if not len(data):
            return
        with self._lock:
            if offset == self.DATA:
                value = self._read_data()
            elif offset == self.COMMAND:
                value = self._status()
            else:
                value = 0xFF
        data[0] = value
        if len(data) > 1:
            data[1:] = b"\xff" * (len(data) - 1)

    def write(self, offset: int, data) -> None:
        if not len(data):
            return
        value = data[0]
        with self._lock:
            if offset == self.DATA:
                reset = self._write_data(value)
            elif offset == self.COMMAND:
                reset = self._write_command(value)
            else:
                reset = False
        # Outside the lock: ending the VM may wait for other vCPU threads.
        if reset:
            self.request_exit(0, "reset")

    # ---- keys from the host ------------------------------------------------

    #: Ctrl, Alt, Delete pressed then released, in scan code set 2 (what Firecracker's
    #: SendCtrlAltDel sends) and as the controller's translation gives them (set 1)
    CTRL_ALT_DEL_SET2 = bytes((0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14))
    CTRL_ALT_DEL_SET1 = bytes((0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D))

    def press_ctrl_alt_del(self) -> bool:
        """Queue Ctrl-Alt-Del as the keyboard sends it; False when the guest disabled the keyboard."""
        with self._lock:
            if not self.scanning or self.ctr & CTR_KBDDIS:
                return False
            translated = bool(self.ctr & CTR_XLATE) or self.scancode_set == 1
            self._keyboard.extend(self.CTRL_ALT_DEL_SET1 if translated else self.CTRL_ALT_DEL_SET2)
            self._refill()
        return True

    # ---- controller ----------------------------------------------------

    def _status(self) -> int:
        status = STATUS_UNLOCKED
        if self._output is not None:
            status |= STATUS_OBF
            if self._output_aux:
                status |= STATUS_AUXDATA
        if self.ctr & CTR_SYS:
            status |= STATUS_SYS
        if self._last_write_was_command:
            status |= STATUS_CMD
        return status

    def _read_data(self) -> int:
        if self._output is None:
            return self._last_output  # the register keeps its stale byte
        value = self._last_output = self._output
        self._output = None
        self._output_aux = False
        self._set_irq(False)
        self._refill()
        return value

    def _respond(self, value: int, aux: bool = False) -> None:
        """A controller reply: it takes the output register, replacing a stale byte."""
        self._output = value
        self._output_aux = aux
        self._update_irq()

    def _refill(self) -> None:
        if self._output is None and self._keyboard and not self.ctr & CTR_KBDDIS:
            self._output = self._keyboard.popleft()
            self._output_aux = False
        self._update_irq()

    def _update_irq(self) -> None:
        level = self._output is not None and not self._output_aux and bool(self.ctr & CTR_KBDINT)
        self._set_irq(level)

    def _set_irq(self, level: bool) -> None:
        # ISA IRQ 1 is edge-triggered: reading a byte drops the line so the
        # next byte makes a new edge.
        if self.irq_kbd is not None:
            self.irq_kbd.set_level(level)

    def _write_command(self, command: int) -> bool:
        self._last_write_was_command = True
        self._pending_command = None
        if command == CMD_READ_CTR:
            self._respond(self.ctr)
        elif CMD_READ_CTR < command < CMD_READ_CTR + 0x20:
            self._respond(self.ram[command - CMD_READ_CTR])
        elif CMD_WRITE_CTR <= command < CMD_WRITE_CTR + 0x20:
            self._pending_command = command
        elif command in (CMD_WRITE_OUTPUT_PORT, CMD_WRITE_KBD_OUTPUT, CMD_WRITE_AUX_OUTPUT, CMD_WRITE_AUX):
            self._pending_command = command
        elif command == CMD_AUX_DISABLE:
            self._set_ctr(self.ctr | CTR_AUXDIS)
        elif command == CMD_AUX_ENABLE:
            self._set_ctr(self.ctr & ~CTR_AUXDIS)
        elif command == CMD_AUX_TEST:
            self._respond(AUX_CLOCK_STUCK_LOW)  # there is no AUX port
        elif command == CMD_SELF_TEST:
            self._set_ctr(self.ctr | CTR_SYS)
            self._respond(SELF_TEST_OK)
        elif command == CMD_KBD_TEST:
            self._respond(INTERFACE_OK)
        elif command == CMD_KBD_DISABLE:
            self._set_ctr(self.ctr | CTR_KBDDIS)
        elif command == CMD_KBD_ENABLE:
            self._set_ctr(self.ctr & ~CTR_KBDDIS)
        elif command == CMD_READ_INPUT_PORT:
            self._respond(0x80)  # bit 7: keyboard not inhibited
        elif command == CMD_READ_OUTPUT_PORT:
            self._respond(self._output_port_value())
        elif command >= 0xF0:
            # Pulse output lines: a 0 in bit 0 pulses the CPU reset line.
            return not command & OUTPUT_PORT_RESET
        else:
            log.debug("i8042: ignoring unknown controller command %#04x", command)
        return False

    def _write_data(self, value: int) -> bool:
        self._last_write_was_command = False
        command, self._pending_command = self._pending_command, None
        if command is None:
            self._keyboard_command(value)
        elif CMD_WRITE_CTR <= command < CMD_WRITE_CTR + 0x20:
            if command == CMD_WRITE_CTR:
                self._set_ctr(value)
            else:
                self.ram[command - CMD_WRITE_CTR] = value
        elif command == CMD_WRITE_OUTPUT_PORT:
            self.output_port = value
            if not value & OUTPUT_PORT_RESET:
                return True
        elif command == CMD_WRITE_KBD_OUTPUT:
            self._respond(value)
        elif command == CMD_WRITE_AUX_OUTPUT:
            self._respond(value)  # no AUX port: the echo comes back as keyboard data
        elif command == CMD_WRITE_AUX:
            self._respond(AUX_NO_DEVICE, aux=True)
        return False

    def _set_ctr(self, value: int) -> None:
        self.ctr = value
        self.ram[0] = value
        self._refill()

    def _output_port_value(self) -> int:
        value = self.output_port & (OUTPUT_PORT_RESET | OUTPUT_PORT_A20)
        if self._output is not None:
            value |= 0x10  # "output buffer full" line to IRQ 1
        return value

    # ---- the keyboard --------------------------------------------------

    def _keyboard_reply(self, *values: int) -> None:
        for value in values:
            if len(self._keyboard) < KEYBOARD_QUEUE_LIMIT:
                self._keyboard.append(value)
        self._refill()

    def _keyboard_command(self, value: int) -> None:
        argument_for, self._keyboard_pending = self._keyboard_pending, None
        if argument_for is not None and value < 0xED:
            # The second byte of a two-byte command (a command byte >= 0xED
            # instead aborts it and runs as a new command).
            if argument_for == KBD_SET_LEDS:
                self.leds = value & 0x07
                self._keyboard_reply(KBD_ACK)
            elif argument_for == KBD_SET_TYPEMATIC:
                self._keyboard_reply(KBD_ACK)
            elif argument_for == KBD_SCANCODE_SET:
                if value == 0:
                    number = self.scancode_set
                    if self.ctr & CTR_XLATE:
                        number = TRANSLATED_SET_NUMBER[number]
                    self._keyboard_reply(KBD_ACK, number)
                elif value in (1, 2, 3):
                    self.scancode_set = value
                    self._keyboard_reply(KBD_ACK)
                else:
                    self._keyboard_reply(KBD_RESEND)
            return
        if value == KBD_RESET:
            self._keyboard.clear()
            self.scanning, self.scancode_set, self.leds = True, 2, 0
            self._keyboard_reply(KBD_ACK, KBD_BAT_OK)
        elif value == KBD_GET_ID:
            ident = KBD_ID_TRANSLATED if self.ctr & CTR_XLATE else KBD_ID
            self._keyboard_reply(KBD_ACK, *ident)
        elif value in (KBD_SET_LEDS, KBD_SET_TYPEMATIC, KBD_SCANCODE_SET):
            self._keyboard_pending = value
            self._keyboard_reply(KBD_ACK)
        elif value == KBD_ENABLE:
            self.scanning = True
            self._keyboard_reply(KBD_ACK)
        elif value == KBD_DISABLE:
            self.scanning = False
            self._keyboard_reply(KBD_ACK)
        elif value == KBD_SET_DEFAULT:
            self.scancode_set, self.leds = 2, 0
            self._keyboard_reply(KBD_ACK)
        elif value == KBD_ECHO:
            self._keyboard_reply(KBD_ECHO)
        elif 0xF7 <= value <= 0xFD:
            self._keyboard_reply(KBD_ACK)  # scan-code-set-3 key attributes: accepted, no effect
        else:
            self._keyboard_reply(KBD_RESEND)
