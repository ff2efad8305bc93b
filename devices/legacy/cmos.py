"""CMOS: an MC146818 real-time clock and its 128 bytes of NVRAM.

Ports 0x70 (index; bit 7 disables NMI) and 0x71 (data), inserted as one
two-port range at ``layout.PORT_CMOS``.

The clock reads UTC from ``clock()`` each time a time register is read, so it
never drifts from the host and needs no timer. Register B selects BCD or binary
and 12 or 24 hours for every read and write. Setting register B's SET bit, or
holding the divider chain in reset through register A (Linux's
``mc146818_set_time`` does both), freezes the clock while the guest writes new
values; releasing it resumes the clock from them.

No interrupts: the periodic, alarm and update-ended interrupts (IRQ 8) would
need a timer of their own, so register C's flags always read 0. Linux's
rtc-cmos works without them (the RTC core emulates update interrupts).

The remaining bytes are NVRAM, with the memory sizes a BIOS would leave there
(read by firmware-style code and old loaders).
"""

from __future__ import annotations

import calendar
import logging
import math
import threading
import time
from typing import Callable

from pyvmm.devices.guestlog import GuestLog
from pyvmm.errors import DeviceError
from pyvmm.vmm import layout

log = logging.getLogger("pyvmm.cmos")

SECONDS = 0x00
SECONDS_ALARM = 0x01
MINUTES = 0x02
MINUTES_ALARM = 0x03
HOURS = 0x04
HOURS_ALARM = 0x05
WEEKDAY = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
CENTURY = 0x32
TIME_REGISTERS = (SECONDS, MINUTES, HOURS, WEEKDAY, DAY_OF_MONTH, MONTH, YEAR, CENTURY)

REG_A_UIP = 0x80  # update in progress
REG_A_DIVIDER_32KHZ = 0x20  # divider bits 6..4 = 010: normal time base
REG_A_RATE_1024HZ = 0x06
REG_B_SET = 0x80
REG_B_24H = 0x02
REG_B_BINARY = 0x04
REG_D_VALID_RAM = 0x80
HOUR_PM = 0x80  # 12-hour mode

# UIP rises 244 us before each update (the datasheet's set-up time); time
# registers are computed atomically here, so the window only has to look real.
UIP_WINDOW = 244e-6

BASE_MEMORY_KIB = 640
NVRAM_SIZE = 128


def _to_bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


class Cmos:
    INDEX = 0
    DATA = 1

    def __init__(self, memory_size: int, clock: Callable[[], float] = time.time):
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size <= 0:
            raise DeviceError(f"cmos: memory_size must be a positive number of bytes, not {memory_size!r}")
        self._clock = clock
        self._lock = threading.Lock()
        self.nvram = bytearray(NVRAM_SIZE)
        self.index = 0
        self.nmi_disabled = False
        self.reg_a = REG_A_DIVIDER_32KHZ | REG_A_RATE_1024HZ
        self.reg_b = REG_B_24H  # 24 h, BCD: the only mode Linux's rtc-cmos accepts without a warning
        self._offset = 0.0  # guest RTC time minus clock(), in seconds
        self._frozen: dict[int, int] | None = None  # binary field values while the clock is held
        self._last_uip_clock: float | None = None
        self.guest_log = GuestLog(log, "cmos")
        self._store_memory_size(memory_size)

    # ---- bus interface -------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        if not len(data):
            return
        with self._lock:
            if offset == self.INDEX:
                value = self.index | (0x80 if self.nmi_disabled else 0)
            elif offset == self.DATA:
                value = self._read_register(self.index)
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
            if offset == self.INDEX:
                self.nmi_disabled = bool(value & 0x80)
                self.index = value & 0x7F
            elif offset == self.DATA:
                self._write_register(self.index, value)

    # ---- registers -----------------------------------------------------

    def _read_register(self, index: int) -> int:
        if index in TIME_REGISTERS:
            return self._encode(index, self._fields()[index])
        if index == REG_A:
            return self.reg_a | (REG_A_UIP if self._update_in_progress() else 0)
        if index == REG_B:
            return self.reg_b
        if index == REG_C:
            return 0  # no interrupt flags are ever raised (see the module docstring); read-to-clear is moot
        if index == REG_D:
            return REG_D_VALID_RAM
        return self.nvram[index]

    def _write_register(self, index: int, value: int) -> None:
        if index in TIME_REGISTERS:
            fields = self._fields()
            fields[index] = self._decode(index, value)
            if self._frozen is not None:
                self._frozen = fields
            else:
                self._set_time(fields)
        elif index == REG_A:
            self.reg_a = value & ~REG_A_UIP  # UIP is read-only
            self._hold_or_run()
        elif index == REG_B:
            self.reg_b = value
            self._hold_or_run()
        elif index in (REG_C, REG_D):
            pass  # read-only
        else:
            self.nvram[index] = value

    # ---- the clock -----------------------------------------------------

    def _running(self) -> bool:
        divider = (self.reg_a >> 4) & 0x7
        return not self.reg_b & REG_B_SET and divider < 0b110  # 11x holds the divider chain in reset

    def _hold_or_run(self) -> None:
        if not self._running() and self._frozen is None:
            self._frozen = self._fields()
        elif self._running() and self._frozen is not None:
            fields, self._frozen = self._frozen, None
            self._set_time(fields)

    def _fields(self) -> dict[int, int]:
        """The time registers as binary numbers (hours 0..23)."""
        if self._frozen is not None:
            return dict(self._frozen)
        tm = time.gmtime(math.floor(self._clock() + self._offset))
        return {
            SECONDS: tm.tm_sec,
            MINUTES: tm.tm_min,
            HOURS: tm.tm_hour,
            WEEKDAY: (tm.tm_wday + 1) % 7 + 1,  # RTC: Sunday = 1; Python: Monday = 0
            DAY_OF_MONTH: tm.tm_mday,
            MONTH: tm.tm_mon,
            YEAR: tm.tm_year % 100,
            CENTURY: tm.tm_year // 100,
        }

    def _set_time(self, fields: dict[int, int]) -> None:
        year = fields[CENTURY] * 100 + fields[YEAR]
        try:
            epoch = calendar.timegm(
                (year, fields[MONTH], fields[DAY_OF_MONTH], fields[HOURS], fields[MINUTES], fields[SECONDS], 0, 0, 0)
            )
            time.gmtime(epoch)  # rejects years the host cannot represent
        except (ValueError, OverflowError, OSError):
            self.guest_log.warning("invalid time", "cmos: guest set an invalid time %s; the clock keeps its old time",
                                   fields)  # fmt: skip
            return
        # Keep the host clock's sub-second phase so seconds tick in step with it.
        self._offset = epoch - math.floor(self._clock())

    def _update_in_progress(self) -> bool:
        if not self._running():
            return False
        now = self._clock()
        if now == self._last_uip_clock:
            # A clock that does not advance (a test's fixed clock) must not
            # keep UIP set forever: guests spin on it.
            return False
        in_window = (now + self._offset) % 1.0 >= 1.0 - UIP_WINDOW
        self._last_uip_clock = now if in_window else None
        return in_window

    def _encode(self, index: int, value: int) -> int:
        binary = self.reg_b & REG_B_BINARY
        if index == HOURS and not self.reg_b & REG_B_24H:
            pm = HOUR_PM if value >= 12 else 0
            hour12 = value % 12 or 12
            return (hour12 if binary else _to_bcd(hour12)) | pm
        return value if binary else _to_bcd(value)

    def _decode(self, index: int, value: int) -> int:
        binary = self.reg_b & REG_B_BINARY
        if index == HOURS and not self.reg_b & REG_B_24H:
            hour12 = value & 0x7F
            hour12 = hour12 if binary else _from_bcd(hour12)
            return hour12 % 12 + (12 if value & HOUR_PM else 0)
        return value if binary else _from_bcd(value)

    # ---- memory size bytes ---------------------------------------------

    def _store_memory_size(self, memory_size: int) -> None:
        below_4g = min(memory_size, layout.MMIO_GAP_START)
        above_4g = max(0, memory_size - layout.MMIO_GAP_START)
        extended_kib = min(max(0, below_4g - layout.MiB) // layout.KiB, 0xFFFF)
        above_16m = min(max(0, below_4g - 16 * layout.MiB) // (64 * layout.KiB), 0xFFFF)
        high_64k = min(above_4g // (64 * layout.KiB), 0xFFFFFF)
        self.nvram[0x15:0x17] = BASE_MEMORY_KIB.to_bytes(2, "little")
        self.nvram[0x17:0x19] = extended_kib.to_bytes(2, "little")
        self.nvram[0x30:0x32] = extended_kib.to_bytes(2, "little")
        self.nvram[0x34:0x36] = above_16m.to_bytes(2, "little")
        self.nvram[0x5B:0x5E] = high_64k.to_bytes(3, "little")
        # Standard checksum over 0x10..0x2D, stored big-endian at 0x2E.
        self.nvram[0x2E:0x30] = sum(self.nvram[0x10:0x2E]).to_bytes(2, "big")
