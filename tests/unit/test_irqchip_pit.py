"""The 8254 PIT and port 0x61, including Linux's TSC calibration loops, with a fake clock."""

import pytest

from pyvmm.accel.irqchip import PIT_HZ, Irqchip


class FakeClock:
    """Time stands still unless a test moves it; ``step`` advances it on every read
    (the cost of one trapped port access in a slow interpreter)."""

    def __init__(self, now=500.0, step=0.0):
        self.now = now
        self.step = step

    def __call__(self):
        self.now += self.step
        return self.now

    def ticks(self, n):
        self.now += n / PIT_HZ


def out(chip, port, value):
    chip.pio_write(0, port, 1, value)


def inb(chip, port):
    return chip.pio_read(0, port, 1)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def chip(clock):
    return Irqchip(1, clock=clock)


def read_word(chip, port):
    lsb = inb(chip, port)
    return lsb | inb(chip, port) << 8


def test_mode2_counts_down_and_reloads(chip, clock):
    out(chip, 0x43, 0x34)  # channel 0, lobyte/hibyte, mode 2 (Linux's periodic PIT)
    out(chip, 0x40, 1000 & 0xFF)
    out(chip, 0x40, 1000 >> 8)
    clock.ticks(10.5)
    out(chip, 0x43, 0x00)  # counter latch
    clock.ticks(100)  # the latched value does not move
    assert read_word(chip, 0x40) == 990
    clock.ticks(1000 - 110)  # one full period after the load
    out(chip, 0x43, 0x00)
    assert read_word(chip, 0x40) == 1000
    clock.ticks(999)
    out(chip, 0x43, 0x00)
    assert read_word(chip, 0x40) == 1


def test_mode3_square_wave_counts_by_two_and_toggles_out(chip, clock):
    out(chip, 0x43, 0xB6)  # channel 2, lobyte/hibyte, mode 3
    out(chip, 0x42, 100)
    out(chip, 0x42, 0)
    out(chip, 0x61, 0x01)  # gate 2 high starts it
    clock.ticks(10.5)
    out(chip, 0x43, 0x80)  # latch channel 2
    assert read_word(chip, 0x42) == 80
    assert inb(chip, 0x61) & 0x20  # first half: OUT high
    clock.ticks(50)
    assert not inb(chip, 0x61) & 0x20  # second half: low
    clock.ticks(40)
    assert inb(chip, 0x61) & 0x20


def test_read_back_status_and_count(chip, clock):
    out(chip, 0x43, 0x30)  # channel 0, mode 0
    # before a count is written: null count set, OUT low
    out(chip, 0x43, 0xE2)  # read-back status of channel 0
    status = inb(chip, 0x40)
    assert status == 0x40 | 0x30 | (0 << 1)
    out(chip, 0x40, 0x10)
    out(chip, 0x40, 0x00)  # count 16
    clock.ticks(4.5)
    out(chip, 0x43, 0xC2)  # read-back: latch status and count of channel 0
    assert inb(chip, 0x40) == 0x30  # status first: OUT low, count loaded, lobyte/hibyte, mode 0
    assert read_word(chip, 0x40) == 12
    clock.ticks(20)
    out(chip, 0x43, 0xE2)
    assert inb(chip, 0x40) & 0x80  # terminal count reached: OUT high


def test_lobyte_only_access_and_bcd(chip, clock):
    out(chip, 0x43, 0x51)  # channel 1, lobyte only, mode 0, BCD
    out(chip, 0x41, 0x99)  # 99 decimal
    clock.ticks(9.5)
    assert inb(chip, 0x41) == 0x90
    clock.ticks(90)
    assert inb(chip, 0x41) == 0x00  # (99 - 99) in BCD: the count wraps to 9999 next


def test_port61_out2_mode0_rises_at_terminal_count(chip, clock):
    out(chip, 0x61, (inb(chip, 0x61) & ~0x02) | 0x01)
    out(chip, 0x43, 0xB0)  # channel 2, mode 0
    assert not inb(chip, 0x61) & 0x20  # mode 0 drives OUT low
    latch = PIT_HZ // 100
    out(chip, 0x42, latch & 0xFF)
    out(chip, 0x42, latch >> 8)
    clock.ticks(latch - 0.5)  # half-tick offsets: a real clock never lands on a tick edge
    assert not inb(chip, 0x61) & 0x20
    clock.ticks(1)
    assert inb(chip, 0x61) & 0x20
    assert inb(chip, 0x61) & 0x03 == 0x01


def test_gate_low_pauses_mode0(chip, clock):
    out(chip, 0x61, 0x00)
    out(chip, 0x43, 0xB0)
    out(chip, 0x42, 100)
    out(chip, 0x42, 0)
    clock.ticks(500)  # gate low: nothing counted
    out(chip, 0x43, 0x80)
    assert read_word(chip, 0x42) == 100
    out(chip, 0x61, 0x01)
    clock.ticks(40.5)
    out(chip, 0x61, 0x00)
    clock.ticks(500)
    out(chip, 0x43, 0x80)
    assert read_word(chip, 0x42) == 60


def pit_calibrate_tsc(chip, clock, tsc_hz, latch, ms, loopmin):
    """arch/x86/kernel/tsc.c pit_calibrate_tsc(), with RDTSC = host time * tsc_hz."""

    def rdtsc():
        return int(clock.now * tsc_hz)

    out(chip, 0x61, (inb(chip, 0x61) & ~0x02) | 0x01)
    out(chip, 0x43, 0xB0)
    out(chip, 0x42, latch & 0xFF)
    out(chip, 0x42, latch >> 8)
    tsc = t1 = t2 = rdtsc()
    pitcnt, tscmin, tscmax = 0, 1 << 64, 0
    while not inb(chip, 0x61) & 0x20:
        t2 = rdtsc()
        delta = t2 - tsc
        tsc = t2
        tscmin, tscmax = min(tscmin, delta), max(tscmax, delta)
        pitcnt += 1
    if pitcnt < loopmin or tscmax > 10 * tscmin:
        return None
    return (t2 - t1) // ms  # kHz


@pytest.mark.parametrize("access_cost", [0.2e-6, 3e-6, 9e-6])
def test_linux_pit_calibrate_tsc_measures_host_time(access_cost):
    # every port access costs the guest access_cost seconds of host time; the PIT must
    # answer from the same time base as the TSC, so the result is the TSC frequency
    clock = FakeClock(step=access_cost)
    chip = Irqchip(1, clock=clock)
    tsc_hz = 2_500_000_000
    khz = pit_calibrate_tsc(chip, clock, tsc_hz, latch=PIT_HZ // 100, ms=10, loopmin=1000)
    assert khz is not None
    assert abs(khz - tsc_hz / 1000) / (tsc_hz / 1000) < 0.002


def quick_pit_calibrate(chip, clock, tsc_hz):
    """arch/x86/kernel/tsc.c quick_pit_calibrate(): follows the MSB of channel 2 down."""

    def rdtsc():
        return int(clock.now * tsc_hz)

    def verify_msb(val):
        inb(chip, 0x42)
        return inb(chip, 0x42) == val

    def expect_msb(val):
        count, tsc, prev = 0, 0, 0
        while count < 50000:
            if not verify_msb(val):
                break
            prev, tsc = tsc, rdtsc()
            count += 1
        return count > 5, tsc, rdtsc() - prev

    out(chip, 0x61, (inb(chip, 0x61) & ~0x02) | 0x01)
    out(chip, 0x43, 0xB0)
    out(chip, 0x42, 0xFF)
    out(chip, 0x42, 0xFF)
    verify_msb(0)
    max_iterations = 50 * PIT_HZ // 1000 // 256
    ok, tsc, d1 = expect_msb(0xFF)
    if not ok:
        return None
    for i in range(1, max_iterations + 1):
        ok, delta, d2 = expect_msb(0xFF - i)
        if not ok:
            return None
        delta -= tsc
        if i == 1 and d1 + d2 >= (delta * max_iterations) >> 11:
            return None
        if d1 + d2 >= delta >> 11:
            continue
        if not verify_msb(0xFE - i):
            return None
        return delta * PIT_HZ // (i * 256 * 1000)  # kHz, as Linux computes it
    return None


def test_linux_quick_pit_calibrate_with_fast_port_access():
    clock = FakeClock(step=0.1e-6)
    chip = Irqchip(1, clock=clock)
    tsc_hz = 3_000_000_000
    khz = quick_pit_calibrate(chip, clock, tsc_hz)
    assert khz is not None
    assert abs(khz - tsc_hz / 1000) / (tsc_hz / 1000) < 0.001


def test_pit_irq0_periodic_reaches_ioapic_and_pic(clock):
    woken = []
    chip = Irqchip(1, clock=clock, wake=woken.append)
    # PIC: vectors 0x30.., IRQ0 unmasked; the BSP takes it through LINT0 ExtINT
    for port, value in ((0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFE)):
        out(chip, port, value)
    out(chip, 0x43, 0x34)
    out(chip, 0x40, 0x9C)
    out(chip, 0x40, 0x2E)  # 11932: 100 Hz
    start = clock.now
    assert woken == [0]  # a deadline appeared for the BSP: its backend must re-read it
    woken.clear()
    assert chip.next_deadline(0) == pytest.approx(start + 11932 / PIT_HZ)
    chip.poll()
    assert not chip.has_interrupt(0)
    clock.ticks(11932)
    chip.poll()
    assert woken == [0]
    assert chip.ack_interrupt(0) == 0x30
    out(chip, 0x20, 0x20)
    # three periods late: three ticks owed, taken one after another's EOI (a periodic
    # tick counts jiffies per interrupt); the next deadline is back on the grid
    clock.ticks(3 * 11932 + 10)
    chip.poll()
    assert chip.next_deadline(0) == pytest.approx(start + 5 * 11932 / PIT_HZ)
    for _ in range(3):
        assert chip.ack_interrupt(0) == 0x30
        assert not chip.has_interrupt(0)  # the next owed tick waits for the EOI
        out(chip, 0x20, 0x20)
    assert not chip.has_interrupt(0)
    assert chip.pit.irq0_backlog == 0


def test_pit_ticks_merged_into_a_pending_irq0_are_owed(clock):
    chip = Irqchip(1, clock=clock)
    for port, value in ((0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFE)):
        out(chip, port, value)
    out(chip, 0x43, 0x34)
    out(chip, 0x40, 100)
    out(chip, 0x40, 0)
    clock.ticks(0.5)  # off the tick edges
    for _ in range(4):  # the guest has interrupts disabled for four periods, polled on time
        clock.ticks(100)
        chip.poll()
    taken = 0
    while chip.ack_interrupt(0) is not None:
        taken += 1
        out(chip, 0x20, 0x20)
    assert taken == 4
    # reprogramming the PIT forgets what was owed
    clock.ticks(350)
    chip.poll()
    out(chip, 0x43, 0x34)
    out(chip, 0x40, 100)
    out(chip, 0x40, 0)
    assert chip.ack_interrupt(0) == 0x30
    out(chip, 0x20, 0x20)
    assert chip.ack_interrupt(0) is None


def test_pit_mode0_oneshot_fires_once(chip, clock):
    for port, value in ((0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFE)):
        out(chip, port, value)
    out(chip, 0x43, 0x30)
    out(chip, 0x40, 100)
    out(chip, 0x40, 0)
    clock.ticks(100)
    chip.poll()
    assert chip.ack_interrupt(0) == 0x30
    out(chip, 0x20, 0x20)
    clock.ticks(70000)
    chip.poll()
    assert not chip.has_interrupt(0)
    assert chip.next_deadline(0) is None


def test_pit_deadline_not_reported_to_a_vcpu_that_cannot_receive_it(clock):
    chip = Irqchip(2, clock=clock)
    out(chip, 0x43, 0x34)
    out(chip, 0x40, 0)
    out(chip, 0x40, 0)
    assert chip.next_deadline(1) is None  # the AP's LINT0 is masked and IOAPIC pin 2 is masked
    assert chip.next_deadline(0) == pytest.approx(clock.now + 65536 / PIT_HZ)  # BSP via LINT0
    out(chip, 0x21, 0x01)  # mask IRQ0 in the PIC
    assert chip.next_deadline(0) is None
