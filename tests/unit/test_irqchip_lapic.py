"""Local APICs: registers, timer, priorities, IPIs (INIT/SIPI, logical and broadcast), locking."""

import threading

import pytest

from pyvmm.accel.irqchip import LAPIC_TIMER_HZ, Irqchip, IrqchipError

LAPIC = 0xFEE00000
ID, VERSION, TPR, PPR, EOI, LDR, DFR, SVR = 0x20, 0x30, 0x80, 0xA0, 0xB0, 0xD0, 0xE0, 0xF0
ISR, TMR, IRR, ESR = 0x100, 0x180, 0x200, 0x280
ICR_LOW, ICR_HIGH = 0x300, 0x310
LVT_TIMER, LVT_LINT0, LVT_LINT1, LVT_ERROR = 0x320, 0x350, 0x360, 0x370
TIMER_INITIAL, TIMER_CURRENT, TIMER_DIVIDE = 0x380, 0x390, 0x3E0
MASKED, PERIODIC = 1 << 16, 1 << 17


class FakeClock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


def w(chip, cpu, reg, value):
    chip.mmio_write(cpu, LAPIC + reg, 4, value)


def r(chip, cpu, reg):
    return chip.mmio_read(cpu, LAPIC + reg, 4)


def enable(chip, cpu):
    w(chip, cpu, SVR, 0x1FF)
    w(chip, cpu, DFR, 0xFFFFFFFF)
    w(chip, cpu, LDR, (1 << cpu) << 24)


def ipi(chip, cpu, dest, low):
    """Linux's __default_send_IPI_dest_field(): ICR high, then ICR low."""
    w(chip, cpu, ICR_HIGH, dest << 24)
    w(chip, cpu, ICR_LOW, low)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def woken():
    return []


@pytest.fixture
def chip(clock, woken):
    chip = Irqchip(4, clock=clock, wake=woken.append)
    for cpu in range(4):
        enable(chip, cpu)
    return chip


def test_reset_state_and_apic_base():
    chip = Irqchip(2, clock=FakeClock())
    assert r(chip, 0, VERSION) == 0x50014
    assert r(chip, 1, ID) == 1 << 24
    assert chip.get_apic_base(0) == 0xFEE00900  # enabled, BSP
    assert chip.get_apic_base(1) == 0xFEE00800
    # the BSP is in the virtual wire state firmware leaves; an AP is at power-up state
    assert r(chip, 0, SVR) == 0x1FF and r(chip, 0, LVT_LINT0) == 0x700 and r(chip, 0, LVT_LINT1) == 0x400
    assert r(chip, 1, SVR) == 0xFF and r(chip, 1, LVT_LINT0) == MASKED
    assert r(chip, 1, DFR) == 0xFFFFFFFF and r(chip, 1, LVT_TIMER) == MASKED
    # byte reads see the register's bytes; bytes 4-15 of a slot read 0
    assert chip.mmio_read(0, LAPIC + VERSION, 1) == 0x14
    assert chip.mmio_read(0, LAPIC + VERSION + 2, 1) == 0x05
    assert chip.mmio_read(0, LAPIC + VERSION + 4, 4) == 0


def test_software_disable_masks_lvts(chip):
    w(chip, 1, LVT_LINT0, 0x700)
    w(chip, 1, SVR, 0xFF)
    assert r(chip, 1, LVT_LINT0) == 0x10700
    w(chip, 1, LVT_TIMER, 0x40)
    assert r(chip, 1, LVT_TIMER) == MASKED | 0x40
    w(chip, 1, SVR, 0x1FF)
    w(chip, 1, LVT_TIMER, 0x40)
    assert r(chip, 1, LVT_TIMER) == 0x40


def test_oneshot_timer(chip, clock, woken):
    w(chip, 0, TIMER_DIVIDE, 0x3)  # divide by 16
    w(chip, 0, LVT_TIMER, 0xEC)
    w(chip, 0, TIMER_INITIAL, 1_000_000)
    period = 1_000_000 * 16 / LAPIC_TIMER_HZ
    start = clock.now
    assert chip.next_deadline(0) == pytest.approx(start + period)
    assert chip.next_deadline(1) is None
    clock.now = start + period / 4
    assert r(chip, 0, TIMER_CURRENT) == pytest.approx(750_000, abs=1)
    chip.poll()
    assert not chip.has_interrupt(0)
    clock.now = start + period + 1e-9
    woken.clear()
    chip.poll()
    assert woken == [0]
    assert chip.ack_interrupt(0) == 0xEC
    assert r(chip, 0, TIMER_CURRENT) == 0
    assert chip.next_deadline(0) is None
    clock.now += 10 * period
    chip.poll()
    assert not chip.has_interrupt(0)


def test_tsc_deadline_mode_fires_once_at_the_deadline_and_reads_back_zero(chip, clock, woken):
    """LVT timer mode 10b (SDM vol. 3 11.5.4.1): the backend arms IA32_TSC_DEADLINE with the clock
    time its TSC gets there; the initial count is ignored and the current count reads 0; the
    expiry interrupts once and clears the deadline; writing 0 disarms; a mode change disarms."""
    w(chip, 0, LVT_TIMER, 0xEC | 2 << 17)
    assert r(chip, 0, LVT_TIMER) == 0xEC | 2 << 17
    w(chip, 0, TIMER_INITIAL, 1000)
    assert r(chip, 0, TIMER_INITIAL) == 0 and r(chip, 0, TIMER_CURRENT) == 0 and chip.next_deadline(0) is None
    chip.set_tsc_deadline(0, 123_456, clock.now + 0.5)
    assert chip.get_tsc_deadline(0) == 123_456 and chip.next_deadline(0) == clock.now + 0.5
    clock.now += 0.25
    chip.poll()
    assert not chip.has_interrupt(0)
    clock.now += 0.5
    woken.clear()
    chip.poll()
    assert woken == [0] and chip.ack_interrupt(0) == 0xEC
    assert chip.get_tsc_deadline(0) == 0 and chip.next_deadline(0) is None
    chip.set_tsc_deadline(0, 5, clock.now + 1)
    chip.set_tsc_deadline(0, 0, None)  # disarmed
    clock.now += 2
    chip.poll()
    assert not chip.has_interrupt(0)
    chip.set_tsc_deadline(0, 7, clock.now + 1)
    w(chip, 0, LVT_TIMER, 0xEC)  # back to one-shot: disarmed, and the MSR reads 0 outside the mode
    assert chip.get_tsc_deadline(0) == 0 and chip.next_deadline(0) is None
    chip.set_tsc_deadline(0, 9, clock.now + 1)  # ignored outside TSC-deadline mode
    assert chip.next_deadline(0) is None


def test_periodic_timer_and_late_poll(chip, clock):
    w(chip, 1, TIMER_DIVIDE, 0xB)  # divide by 1
    w(chip, 1, LVT_TIMER, PERIODIC | 0xEC)
    initial = LAPIC_TIMER_HZ // 250  # 4 ms
    w(chip, 1, TIMER_INITIAL, initial)
    start = clock.now
    for n in range(1, 4):
        clock.now = start + n * 0.004 + 1e-7
        chip.poll()
        assert chip.ack_interrupt(1) == 0xEC
        w(chip, 1, EOI, 0)
    clock.now = start + 0.0125  # half-way through the fourth period
    assert r(chip, 1, TIMER_CURRENT) == pytest.approx(initial * 7 // 8, abs=2)
    clock.now = start + 0.0305  # four expiries late: all four delivered, one per EOI
    chip.poll()
    assert chip.next_deadline(1) == pytest.approx(start + 0.032)  # back on the grid
    for _ in range(4):
        assert chip.ack_interrupt(1) == 0xEC
        assert not chip.has_interrupt(1)
        w(chip, 1, EOI, 0)
    assert chip.ack_interrupt(1) is None
    w(chip, 1, TIMER_INITIAL, 0)  # writing 0 stops it
    assert chip.next_deadline(1) is None


def test_owed_periodic_ticks_are_bounded_and_forgotten_on_reprogramming(chip, clock):
    w(chip, 0, TIMER_DIVIDE, 0xB)
    w(chip, 0, LVT_TIMER, PERIODIC | 0xEC)
    w(chip, 0, TIMER_INITIAL, LAPIC_TIMER_HZ // 1000)  # 1 ms
    clock.now += 10.0  # ten seconds without a poll (a paused VM)
    chip.poll()
    assert chip.lapics[0].timer_backlog == 500  # capped at TICK_BACKLOG_LIMIT_S worth
    w(chip, 0, TIMER_INITIAL, LAPIC_TIMER_HZ // 1000)
    assert chip.lapics[0].timer_backlog == 0
    assert chip.ack_interrupt(0) == 0xEC  # the one already pending in IRR stays
    w(chip, 0, EOI, 0)
    assert chip.ack_interrupt(0) is None


def test_expiries_a_slow_guest_has_not_taken_merge_instead_of_being_owed(chip, clock):
    """Each expiry polled on time while the previous tick still waits in IRR (the guest is behind,
    interrupts off) merges into it, as on hardware: one tick, no backlog fed back to back."""
    w(chip, 0, TIMER_DIVIDE, 0xB)
    w(chip, 0, LVT_TIMER, PERIODIC | 0xEC)
    w(chip, 0, TIMER_INITIAL, LAPIC_TIMER_HZ // 250)  # 4 ms
    start = clock.now
    for n in range(1, 6):
        clock.now = start + n * 0.004 + 1e-7
        chip.poll()
    assert chip.lapics[0].timer_backlog == 0
    assert chip.ack_interrupt(0) == 0xEC
    w(chip, 0, EOI, 0)
    assert chip.ack_interrupt(0) is None


def test_masked_timer_counts_without_interrupting(chip, clock):
    w(chip, 0, TIMER_DIVIDE, 0xB)
    w(chip, 0, LVT_TIMER, MASKED | 0xEC)
    w(chip, 0, TIMER_INITIAL, 1000)
    assert chip.next_deadline(0) is None
    clock.now += 500.5 / LAPIC_TIMER_HZ
    assert r(chip, 0, TIMER_CURRENT) == 500
    clock.now += 1e-3
    chip.poll()
    assert not chip.has_interrupt(0)


def test_divide_change_keeps_the_current_count(chip, clock):
    w(chip, 0, TIMER_DIVIDE, 0xB)
    w(chip, 0, LVT_TIMER, 0xEC)
    w(chip, 0, TIMER_INITIAL, 1000)
    clock.now += 400.5 / LAPIC_TIMER_HZ
    w(chip, 0, TIMER_DIVIDE, 0x0)  # divide by 2
    assert r(chip, 0, TIMER_CURRENT) == 600
    clock.now += 201 / LAPIC_TIMER_HZ  # 100.5 ticks of the halved clock
    assert r(chip, 0, TIMER_CURRENT) == 500


def test_tpr_and_isr_priority(chip):
    ipi(chip, 0, 0, 0x4000 | 0x45)  # fixed, self by physical ID
    w(chip, 0, TPR, 0x50)
    assert not chip.has_interrupt(0)
    assert r(chip, 0, PPR) == 0x50
    w(chip, 0, TPR, 0x40)  # same class as the vector: still blocked
    assert not chip.has_interrupt(0)
    w(chip, 0, TPR, 0x3F)
    assert chip.ack_interrupt(0) == 0x45
    assert r(chip, 0, PPR) == 0x40  # the ISR class dominates the lower TPR
    ipi(chip, 0, 0, 0x41)  # same class as the one in service: waits
    assert not chip.has_interrupt(0)
    ipi(chip, 0, 0, 0x61)  # a higher class nests
    assert chip.ack_interrupt(0) == 0x61
    w(chip, 0, EOI, 0)  # ends 0x61
    w(chip, 0, EOI, 0)  # ends 0x45
    assert chip.ack_interrupt(0) == 0x41
    assert r(chip, 0, ISR + 0x20) == 1 << 1


def test_fixed_ipi_physical_wakes_the_target(chip, woken):
    woken.clear()
    ipi(chip, 0, 2, 0xF3)
    assert woken == [2]
    assert chip.has_interrupt(2) and not chip.has_interrupt(1)
    assert r(chip, 0, ICR_LOW) & (1 << 12) == 0  # delivery status: idle
    assert chip.ack_interrupt(2) == 0xF3


def test_an_ipi_from_another_vcpu_is_reported_once_for_code_sync(chip, woken):
    """Backends with translated-code caches flush them on it (cross-modifying code protocol)."""
    assert not chip.take_cross_cpu_ipi(2)
    ipi(chip, 0, 2, 0xF3)
    assert chip.take_cross_cpu_ipi(2)
    assert not chip.take_cross_cpu_ipi(2)  # consumed
    assert not chip.take_cross_cpu_ipi(0) and not chip.take_cross_cpu_ipi(1)
    ipi(chip, 2, 2, 0xF4)  # a self-IPI is not another CPU's write
    assert not chip.take_cross_cpu_ipi(2)
    chip.set_irq_line(4, True)  # a device interrupt is not an IPI either
    assert not any(chip.take_cross_cpu_ipi(i) for i in range(3))


def test_init_sipi_sequence(chip, woken):
    """Linux's wakeup_secondary_cpu_via_init(): INIT assert, INIT de-assert, SIPI twice."""
    w(chip, 0, ESR, 0)
    woken.clear()
    ipi(chip, 0, 3, 0xC500)  # INIT, level assert, level trigger
    ipi(chip, 0, 3, 0x8500)  # INIT level de-assert: no event
    ipi(chip, 0, 3, 0x0600 | 0x9A)
    ipi(chip, 0, 3, 0x0600 | 0x9A)  # the second SIPI finds the CPU running
    assert chip.take_init_sipi(3) == [("init", 0), ("sipi", 0x9A)]
    assert chip.take_init_sipi(3) == []
    assert set(woken) == {3}
    # INIT reset the target's APIC (SVR back to disabled) but kept its ID
    assert r(chip, 3, SVR) == 0xFF and r(chip, 3, ID) == 3 << 24
    w(chip, 0, ESR, 0)
    assert r(chip, 0, ESR) == 0


def test_sync_arb_ids_broadcast_init_deassert_is_inert(chip):
    # Linux's sync_Arb_IDs(): all-including-self, level-triggered INIT de-assert
    w(chip, 0, ICR_LOW, 0x80000 | 0x8000 | 0x500)
    assert all(chip.take_init_sipi(cpu) == [] for cpu in range(4))
    assert r(chip, 1, SVR) == 0x1FF  # nobody was reset


def test_ap_accepts_a_sipi_without_init_once():
    chip = Irqchip(2, clock=FakeClock())
    ipi(chip, 0, 1, 0x0610)
    ipi(chip, 0, 1, 0x0610)
    assert chip.take_init_sipi(1) == [("sipi", 0x10)]
    ipi(chip, 1, 0, 0x0610)  # the BSP is running: ignored
    assert chip.take_init_sipi(0) == []


def test_logical_flat_and_cluster_destinations(chip):
    ipi(chip, 0, 0x06, 0x800 | 0x50)  # flat: CPUs 1 and 2
    assert [chip.has_interrupt(cpu) for cpu in range(4)] == [False, True, True, False]
    for cpu in (1, 2):
        chip.ack_interrupt(cpu)
        w(chip, cpu, EOI, 0)
    for cpu in range(4):  # cluster model: cluster = cpu // 2, member bit = 1 << cpu % 2
        w(chip, cpu, DFR, 0x0FFFFFFF)
        w(chip, cpu, LDR, ((cpu // 2) << 4 | 1 << (cpu % 2)) << 24)
    ipi(chip, 0, 0x13, 0x800 | 0x51)  # cluster 1, both members: CPUs 2 and 3
    assert [chip.has_interrupt(cpu) for cpu in range(4)] == [False, False, True, True]
    ipi(chip, 0, 0x01, 0x800 | 0x52)  # cluster 0, member 0
    assert chip.has_interrupt(0)


def test_shorthands(chip):
    ipi(chip, 1, 0, 0x40000 | 0x60)  # self
    assert [chip.has_interrupt(cpu) for cpu in range(4)] == [False, True, False, False]
    chip.ack_interrupt(1)
    w(chip, 1, EOI, 0)
    ipi(chip, 1, 0, 0xC0000 | 0x61)  # all excluding self
    assert [chip.has_interrupt(cpu) for cpu in range(4)] == [True, False, True, True]
    ipi(chip, 1, 0, 0x80000 | 0x62)  # all including self
    assert all(chip.has_interrupt(cpu) for cpu in range(4))
    assert chip.ack_interrupt(1) == 0x62
    w(chip, 1, EOI, 0)
    ipi(chip, 0, 0xFF, 0x63)  # physical broadcast
    assert [chip.ack_interrupt(cpu) for cpu in range(4)] == [0x63] * 4


def test_nmi_ipi(chip):
    ipi(chip, 0, 1, 0x400)
    assert chip.has_nmi(1) and not chip.has_interrupt(1)
    assert chip.ack_nmi(1) and not chip.has_nmi(1)


def test_illegal_vector_sets_esr_and_error_lvt(chip):
    w(chip, 0, LVT_ERROR, 0xFE)
    ipi(chip, 0, 1, 0x05)  # vectors 0-15 are illegal
    assert not chip.has_interrupt(1)
    w(chip, 0, ESR, 0)  # a write latches the errors seen so far
    assert r(chip, 0, ESR) == 1 << 5
    assert chip.ack_interrupt(0) == 0xFE
    w(chip, 0, ESR, 0)
    assert r(chip, 0, ESR) == 0


def test_apic_base_relocation_and_disable(chip):
    chip.set_apic_base(1, 0xFED00000 | (1 << 11) | (1 << 10))  # x2APIC bit is ignored
    assert chip.get_apic_base(1) == 0xFED00800
    assert chip.handles_mmio(0xFED00020) and chip.handles_mmio(LAPIC + 0x20)
    assert chip.mmio_read(1, 0xFED00020, 4) == 1 << 24
    chip.set_apic_base(0, 0xFEE00000 | (1 << 11))  # the BSP flag cannot be cleared
    assert chip.get_apic_base(0) == 0xFEE00900
    chip.set_apic_base(2, 0xFEE00000)  # globally disabled: takes no interrupts
    ipi(chip, 0, 2, 0x70)
    assert not chip.has_interrupt(2)
    assert chip.handles_mmio(0xFEC00000)
    assert not chip.handles_mmio(0xFEB00000)


def test_bad_vmm_input_raises_one_line_errors(chip):
    with pytest.raises(IrqchipError, match="vCPU index 9"):
        chip.has_interrupt(9)
    with pytest.raises(IrqchipError, match="MMIO read at 0xfeb00000"):
        chip.mmio_read(0, 0xFEB00000, 4)
    with pytest.raises(IrqchipError, match="3 bytes"):
        chip.mmio_read(0, LAPIC, 3)
    with pytest.raises(IrqchipError, match="vcpu_count 0"):
        Irqchip(0)


def test_wake_runs_without_the_lock():
    # a wake callback that calls back into the chip would deadlock if the lock were held
    seen = []
    chip = Irqchip(2, clock=FakeClock(), wake=lambda cpu: seen.append((cpu, chip.has_interrupt(cpu))))
    enable(chip, 1)
    ipi(chip, 0, 1, 0x80)
    assert seen == [(1, True)]


def test_device_and_vcpu_threads_lose_no_interrupt_and_no_wake():
    """A device thread raises lines; a vCPU thread sleeps between interrupts until wake()."""
    wake = threading.Event()
    chip = Irqchip(2, clock=FakeClock(), wake=lambda cpu: wake.set() if cpu == 0 else None)
    for cpu in (0, 1):
        enable(chip, cpu)
    chip.mmio_write(0, 0xFEC00000, 4, 0x10 + 2 * 9)
    chip.mmio_write(0, 0xFEC00010, 4, 0x8000 | 0x39)  # level, fixed, physical CPU 0
    chip.mmio_write(0, 0xFEC00000, 4, 0x10 + 2 * 5)
    chip.mmio_write(0, 0xFEC00010, 4, 0x35)  # edge, CPU 0
    rounds = 1000
    handled = []
    serviced = threading.Semaphore(0)
    missed_wakes = []

    def device():  # raise the level line and an edge, wait until the driver serviced the level one
        for _ in range(rounds):
            chip.set_irq_line(9, True)
            chip.set_irq_line(5, True)
            chip.set_irq_line(5, False)
            assert serviced.acquire(timeout=5)

    def vcpu():
        while handled.count(0x39) < rounds:
            wake.clear()
            vector = chip.ack_interrupt(0)
            if vector is None:
                if not wake.wait(timeout=2):  # "hlt": a lost wake() would stall here
                    missed_wakes.append(len(handled))
                    return
                continue
            handled.append(vector)
            if vector == 0x39:
                chip.set_irq_line(9, False)  # the handler quietens the device, then EOIs
                chip.mmio_write(0, LAPIC + EOI, 4, 0)
                serviced.release()
            else:
                chip.mmio_write(0, LAPIC + EOI, 4, 0)

    threads = [threading.Thread(target=device), threading.Thread(target=vcpu)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert missed_wakes == []
    assert handled.count(0x39) == rounds
    assert 0 < handled.count(0x35) <= rounds  # edges coalesce while one is pending in IRR


def test_wake_when_a_deadline_appears_or_moves_earlier(clock, woken):
    """A backend waits until the next_deadline it read; programming a timer must wake it."""
    chip = Irqchip(2, clock=clock, wake=woken.append)
    enable(chip, 1)
    assert chip.next_deadline(1) is None  # the backend of vCPU 1 now waits without a timeout
    w(chip, 1, TIMER_DIVIDE, 0xB)
    w(chip, 1, LVT_TIMER, 0xEC)
    woken.clear()
    w(chip, 1, TIMER_INITIAL, LAPIC_TIMER_HZ)  # 1 s
    assert woken == [1]
    assert chip.next_deadline(1) == pytest.approx(clock.now + 1)
    woken.clear()
    w(chip, 1, TIMER_INITIAL, 2 * LAPIC_TIMER_HZ)  # later: the backend wakes at 1 s anyway
    assert woken == []
    w(chip, 1, TIMER_INITIAL, LAPIC_TIMER_HZ // 2)  # earlier than what it knew: wake
    assert woken == [1]
    woken.clear()
    w(chip, 1, EOI, 0)
    assert woken == []


def test_wake_when_the_pit_is_programmed_or_unmasked(clock, woken):
    chip = Irqchip(2, clock=clock, wake=woken.append)
    for cpu in (0, 1):
        assert chip.next_deadline(cpu) is None
    chip.pio_write(0, 0x21, 1, 0xFF)  # IRQ0 masked in the PIC: no deadline for anyone
    chip.pio_write(0, 0x43, 1, 0x34)
    chip.pio_write(0, 0x40, 1, 0x9C)
    chip.pio_write(0, 0x40, 1, 0x2E)
    assert woken == []
    chip.pio_write(0, 0x21, 1, 0xFE)  # unmasked: the BSP (LINT0 ExtINT) now has a deadline
    assert woken == [0]


def test_eoi_or_tpr_that_unblocks_a_pending_vector_wakes(chip, woken):
    ipi(chip, 0, 0, 0x50)
    assert chip.ack_interrupt(0) == 0x50
    ipi(chip, 0, 0, 0x51)  # same class: waits in IRR behind 0x50
    assert not chip.has_interrupt(0)
    woken.clear()
    w(chip, 0, EOI, 0)
    assert woken == [0]  # a backend running the guest must stop to deliver 0x51
    w(chip, 0, TPR, 0x60)
    assert chip.ack_interrupt(0) is None
    woken.clear()
    w(chip, 0, TPR, 0)
    assert woken == [0]
    assert chip.ack_interrupt(0) == 0x51
    woken.clear()
    w(chip, 0, EOI, 0)  # nothing left: no wake
    assert woken == []
