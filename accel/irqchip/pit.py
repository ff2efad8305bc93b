"""The 8254 programmable interval timer (channels 0-2) and port 0x61 (channel 2 gate, OUT2).

Sans-IO: every counter value and output level is computed from the time passed in
(seconds of the chip's clock) at the moment the guest looks, never from a ticking
thread. So a counter read, an OUT2 poll on port 0x61 and the host TSC the
interpreter reports all measure the same real time, which is what Linux's
``pit_calibrate_tsc`` and ``quick_pit_calibrate`` compare.

Per channel the state is the reload value N and the clock time ``start`` when the
counting element was (re)loaded; the count and OUT then follow from d, the number of
input clocks since ``start``:

==== ================================ ======================== ====================
mode count(d)                         OUT(d)                   rising edges at d =
==== ================================ ======================== ====================
0    (N - d) mod 2^16                 d >= N                   N
1    like 0, from the gate trigger    d >= N (high untriggered) N
2    N - d mod N                      d mod N != N - 1         k*N, k >= 1
3    N - (2d mod N)                   d mod N < (N + 1) / 2    k*N, k >= 1
4    (N - d) mod 2^16                 d != N                   N + 1
5    like 4, from the gate trigger    d != N                   N + 1
==== ================================ ======================== ====================

The gate (only channel 2's is wired, to port 0x61 bit 0) pauses modes 0/4, triggers
modes 1/5 on a rising edge, and in modes 2/3 holds OUT high while low and restarts the
count on a rising edge. A new count in modes 2/3 takes effect at once (as QEMU does),
not at the end of the current period.
"""

from __future__ import annotations

import math

PIT_HZ = 1_193_182
TICK_BACKLOG_LIMIT_S = 0.5  # owed periodic IRQ0 edges are capped at this much time
PIT_PORTS = frozenset((0x40, 0x41, 0x42, 0x43))
PORT_SYSTEM_CONTROL_B = 0x61  # bit 0 gate 2, bit 1 speaker data, bit 4 refresh toggle, bit 5 OUT2
REFRESH_PERIOD = 15.085e-6  # port 0x61 bit 4 toggles at this rate (DRAM refresh request)

RW_LATCH, RW_LSB, RW_MSB, RW_WORD = 0, 1, 2, 3


def _to_bcd(value: int) -> int:
    value %= 10000
    return (value // 1000) << 12 | (value // 100 % 10) << 8 | (value // 10 % 10) << 4 | value % 10


def _from_bcd(value: int) -> int:
    return ((value >> 12) & 0xF) * 1000 + ((value >> 8) & 0xF) * 100 + ((value >> 4) & 0xF) * 10 + (value & 0xF)


class PitChannel:
    def __init__(self, gate: bool):
        self.gate = gate
        self.mode = 0
        self.bcd = False
        self.rw_mode = RW_WORD
        self.reload = 0x10000  # N (1..65536, or 1..10000 in BCD)
        self.start: float | None = None  # counting began at this clock time; None = not counting
        self.loaded = False  # a count was written since the last control word
        self.frozen_ticks = 0  # modes 0/4 with the gate low: d is held here
        self.write_msb_next = False
        self.write_lsb = 0
        self.read_msb_next = False
        self.latched: list[int] = []  # bytes of a latched count still to be read
        self.status_latched: int | None = None
        self.null_count = True
        self.edges_done = 0  # rising edges of OUT already signalled (channel 0's IRQ0)

    # --- derived state -----------------------------------------------------
    def ticks(self, now: float) -> int | None:
        """d: input clocks since the counting element was loaded, or None if it is not counting."""
        if self.start is None:
            return None
        if self.mode in (0, 4) and not self.gate:
            return self.frozen_ticks
        if self.mode in (2, 3) and not self.gate:
            return None
        return int((now - self.start) * PIT_HZ)

    def count(self, now: float) -> int:
        """The counting element as the guest reads it (binary; BCD conversion on output)."""
        d = self.ticks(now)
        n = self.reload
        if d is None:
            value = n
        elif self.mode == 2:
            value = n - d % n
        elif self.mode == 3:
            value = n - (2 * d) % n
        else:
            value = n - d
        modulus = 10000 if self.bcd else 0x10000
        return value % modulus

    def out(self, now: float) -> bool:
        mode = self.mode
        if self.start is None:
            # not counting: a mode 0 control word drives OUT low; the other modes hold it high
            return mode != 0
        d = self.ticks(now)
        n = self.reload
        if d is None:  # modes 2/3 held by a low gate
            return True
        if mode in (0, 1):
            return d >= n
        if mode == 2:
            return d % n != n - 1
        if mode == 3:
            return d % n < (n + 1) // 2
        return d != n  # modes 4, 5

    def status(self, now: float) -> int:
        return (
            (0x80 if self.out(now) else 0)
            | (0x40 if self.null_count else 0)
            | self.rw_mode << 4
            | self.mode << 1
            | int(self.bcd)
        )

    def next_edge_time(self) -> float | None:
        """Clock time of the next rising edge of OUT not yet signalled, or None."""
        if self.start is None or (self.mode in (0, 4) and not self.gate) or (self.mode in (2, 3) and not self.gate):
            return None
        n = self.reload
        if self.mode in (2, 3):
            edge = (self.edges_done + 1) * n
        elif self.edges_done:
            return None
        elif self.mode in (0, 1):
            edge = n
        else:
            edge = n + 1
        return self.start + edge / PIT_HZ

    def take_edges(self, now: float) -> int:
        """Consume the rising edges of OUT up to ``now``: how many happened (0 if none)."""
        due = self.next_edge_time()
        if due is None or now < due:
            return 0
        if self.mode in (2, 3):
            passed = max(self.edges_done + 1, self.ticks(now) // self.reload)
            count, self.edges_done = passed - self.edges_done, passed
            return count
        self.edges_done = 1
        return 1

    # --- guest programming -----------------------------------------------
    def control(self, value: int) -> None:
        """A control word for this channel with RW != 0 (a new mode)."""
        self.rw_mode = (value >> 4) & 3
        mode = (value >> 1) & 7
        self.mode = mode - 4 if mode >= 6 else mode  # 6, 7 alias modes 2, 3
        self.bcd = bool(value & 1)
        self.start = None
        self.loaded = False
        self.null_count = True
        self.write_msb_next = False
        self.read_msb_next = False
        self.latched = []
        self.status_latched = None
        self.edges_done = 0

    def latch_count(self, now: float) -> None:
        if self.latched:
            return  # a latched value stays until read
        value = self.count(now)
        if self.bcd:
            value = _to_bcd(value)
        lsb, msb = value & 0xFF, (value >> 8) & 0xFF
        self.latched = {RW_LSB: [lsb], RW_MSB: [msb]}.get(self.rw_mode, [lsb, msb])

    def latch_status(self, now: float) -> None:
        if self.status_latched is None:
            self.status_latched = self.status(now)

    def write_count(self, now: float, value: int) -> None:
        if self.rw_mode == RW_LSB:
            self._load(now, value)
        elif self.rw_mode == RW_MSB:
            self._load(now, value << 8)
        elif not self.write_msb_next:
            self.write_lsb = value
            self.write_msb_next = True
            if self.mode == 0:  # writing the first byte stops a mode 0 count (OUT stays low)
                self.start = None
                self.loaded = False
        else:
            self.write_msb_next = False
            self._load(now, self.write_lsb | value << 8)

    def _load(self, now: float, raw: int) -> None:
        value = _from_bcd(raw) if self.bcd else raw
        self.reload = value or (10000 if self.bcd else 0x10000)
        self.loaded = True
        self.null_count = False  # the count moves into the counting element at once
        self.edges_done = 0
        self.frozen_ticks = 0
        if self.mode in (1, 5):
            self.start = None  # waits for a gate trigger
        else:
            self.start = now

    def read(self, now: float) -> int:
        if self.status_latched is not None:
            value, self.status_latched = self.status_latched, None
            return value
        if self.latched:
            return self.latched.pop(0)
        value = self.count(now)
        if self.bcd:
            value = _to_bcd(value)
        if self.rw_mode == RW_LSB:
            return value & 0xFF
        if self.rw_mode == RW_MSB:
            return (value >> 8) & 0xFF
        msb_now = self.read_msb_next
        self.read_msb_next = not msb_now
        return (value >> 8) & 0xFF if msb_now else value & 0xFF

    def set_gate(self, now: float, gate: bool) -> None:
        if gate == self.gate:
            return
        if self.mode in (0, 4) and self.start is not None:
            if not gate:  # freeze d
                self.frozen_ticks = int((now - self.start) * PIT_HZ)
            else:  # resume from the frozen d
                self.start = now - self.frozen_ticks / PIT_HZ
        self.gate = gate
        if gate and self.loaded and self.mode in (1, 2, 3, 5):
            self.start = now  # a rising gate (re)triggers these modes
            self.edges_done = 0


class Pit:
    """Three channels plus port 0x61. Channel 0's OUT drives IRQ0 through ``take_irq0_edge``."""

    def __init__(self) -> None:
        # channels 0 and 1 have their gates tied high; channel 2's is port 0x61 bit 0
        self.channels = [PitChannel(True), PitChannel(True), PitChannel(False)]
        self.port61 = 0  # bits 0-3 as last written
        self.irq0_backlog = 0  # periodic channel 0 edges the guest is still owed

    def read_port(self, now: float, port: int) -> int:
        if port == PORT_SYSTEM_CONTROL_B:
            refresh = int(now / REFRESH_PERIOD) & 1
            out2 = self.channels[2].out(now)
            return (self.port61 & 0x0F) | refresh << 4 | (0x20 if out2 else 0)
        if port == 0x43:
            return 0xFF  # the control register is write-only
        return self.channels[port - 0x40].read(now)

    def write_port(self, now: float, port: int, value: int) -> None:
        if port == PORT_SYSTEM_CONTROL_B:
            self.port61 = value & 0x0F
            self.channels[2].set_gate(now, bool(value & 1))
        elif port == 0x43:
            self._control(now, value)
        else:
            self.channels[port - 0x40].write_count(now, value)
            if port == 0x40:
                self.irq0_backlog = 0

    def _control(self, now: float, value: int) -> None:
        select = value >> 6
        if select == 3:  # read-back: bits 1-3 select channels, bit 5 clear = count, bit 4 clear = status
            for index in range(3):
                if value & (2 << index):
                    channel = self.channels[index]
                    if not value & 0x20:
                        channel.latch_count(now)
                    if not value & 0x10:
                        channel.latch_status(now)
            return
        channel = self.channels[select]
        if (value >> 4) & 3 == RW_LATCH:
            channel.latch_count(now)
        else:
            channel.control(value)
            if select == 0:
                self.irq0_backlog = 0

    def irq0_deadline(self) -> float:
        due = self.channels[0].next_edge_time()
        return math.inf if due is None else due

    def take_irq0_edges(self, now: float) -> int:
        """Rising edges of OUT0 since the last call (the owner raises IRQ0 once for them)."""
        return self.channels[0].take_edges(now)

    def owe_irq0_edges(self, missed: int) -> None:
        """Edges the guest did not get: beyond the first of a late poll, or merged into a
        still-pending IRQ0. The owner re-raises IRQ0 once per acknowledge of an IRQ0
        vector while any are owed (KVM's PIT "reinject" policy): a kernel with a periodic
        PIT tick counts one jiffy per interrupt, and lost ones make its clocksource
        watchdog reject the TSC. Only periodic modes owe edges; the debt is bounded."""
        channel = self.channels[0]
        if missed > 0 and channel.mode in (2, 3):
            limit = int(TICK_BACKLOG_LIMIT_S * PIT_HZ / channel.reload)
            self.irq0_backlog = min(limit, self.irq0_backlog + missed)

    def take_owed_irq0_edge(self) -> bool:
        if self.irq0_backlog and self.channels[0].mode in (2, 3) and self.channels[0].start is not None:
            self.irq0_backlog -= 1
            return True
        return False
