"""One local APIC in xAPIC mode (MMIO registers), after Intel SDM vol. 3 ch. 11 ("APIC").

Sans-IO and lock-free: the owning ``Irqchip`` serialises calls and is the APIC bus
(``bus.send_ipi``, ``bus.eoi_broadcast``). IRR, ISR and TMR are 256-bit Python ints,
so finding the highest pending vector is one ``bit_length()``.

Not offered, and why:

* x2APIC: not modelled yet (the x2APIC register MSRs are not served), so the APIC is reachable
  only as MMIO at its APIC base.

TSC-deadline mode (LVT timer mode 10b): the deadline is armed through ``set_tsc_deadline`` by a
backend that serves IA32_TSC_DEADLINE (the interpreter, which then offers CPUID.1:ECX[24]); the
backend converts the TSC value into a clock time, as only it knows its TSC.
* EOI-broadcast suppression (the version register's bit 24 is clear), CMCI (max LVT 5).

Timer: counts at ``LAPIC_TIMER_HZ`` (25 MHz) divided by the divide configuration,
from the chip's clock. 25 MHz is the core crystal clock of Intel server parts, which
feeds their APIC timer; a backend reports it as the crystal in CPUID 0x15 (see
``timebase.tsc_cpuid_leaves``) and Linux then sets its APIC timer period from it
without calibrating. A lower crystal than QEMU's 1 GHz APIC bus also leaves Linux's
32-bit ``crystal_khz * numerator`` room for an exact TSC ratio.
"""

from __future__ import annotations

from typing import Protocol

from pyvmm.accel.irqchip.ioapic import DM_EXTINT, DM_FIXED, DM_INIT, DM_LOWEST, DM_NMI, DM_SIPI, DM_SMI, ApicMessage

LAPIC_TIMER_HZ = 25_000_000
#: missed periodic-timer expiries are re-delivered one per acknowledge, up to this much time
TICK_BACKLOG_LIMIT_S = 0.5
LAPIC_VERSION = 0x00050014  # version 0x14 (integrated xAPIC), max LVT entry 5
LAPIC_DEFAULT_BASE = 0xFEE0_0000

APIC_BASE_BSP = 1 << 8
APIC_BASE_ENABLE = 1 << 11
APIC_BASE_X2APIC = 1 << 10  # not offered: a write setting it is ignored
APIC_BASE_ADDRESS_MASK = 0x000F_FFFF_FFFF_F000

# register offsets
REG_ID, REG_VERSION, REG_TPR, REG_APR, REG_PPR, REG_EOI, REG_RRD, REG_LDR, REG_DFR, REG_SVR = (
    0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0)
REG_ISR, REG_TMR, REG_IRR, REG_ESR = 0x100, 0x180, 0x200, 0x280
REG_ICR_LOW, REG_ICR_HIGH = 0x300, 0x310
REG_LVT_TIMER, REG_LVT_THERMAL, REG_LVT_PERF, REG_LVT_LINT0, REG_LVT_LINT1, REG_LVT_ERROR = (
    0x320, 0x330, 0x340, 0x350, 0x360, 0x370)
REG_TIMER_INITIAL, REG_TIMER_CURRENT, REG_TIMER_DIVIDE = 0x380, 0x390, 0x3E0

LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = range(6)
LVT_OFFSETS = (REG_LVT_TIMER, REG_LVT_THERMAL, REG_LVT_PERF, REG_LVT_LINT0, REG_LVT_LINT1, REG_LVT_ERROR)
LVT_MASKED = 1 << 16
LVT_TIMER_PERIODIC = 1 << 17
LVT_TIMER_MODE = 3 << 17
LVT_TIMER_TSC_DEADLINE = 2 << 17
# writable bits per LVT entry: vector, delivery mode, polarity, trigger, mask (+ timer mode)
LVT_WRITABLE = (0x700FF, 0x107FF, 0x107FF, 0x1A7FF, 0x1A7FF, 0x100FF)

SVR_ENABLE = 1 << 8
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECEIVE_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7

ICR_LEVEL_ASSERT = 1 << 14
ICR_TRIGGER_LEVEL = 1 << 15


class ApicBus(Protocol):
    def send_ipi(self, source: LocalApic, message: ApicMessage) -> None: ...
    def eoi_broadcast(self, vector: int) -> None: ...
    def timer_changed(self) -> None: ...


def _vector_class(vector: int) -> int:
    return vector >> 4


class LocalApic:
    def __init__(self, index: int, bus: ApicBus):
        self.index = index
        self.bus = bus
        self.apic_id = index
        self.base = LAPIC_DEFAULT_BASE | APIC_BASE_ENABLE | (APIC_BASE_BSP if index == 0 else 0)
        self.nmi_pending = False
        self.extint_pending = False  # an IOAPIC ExtINT message: INTA goes to the PIC
        self.reset()
        if index == 0:
            self.firmware_handoff()

    def reset(self) -> None:
        """Power-up / INIT state: everything but the APIC ID and the APIC base MSR."""
        self.tpr = 0
        self.ldr = 0
        self.dfr = 0xFFFF_FFFF
        self.svr = 0xFF
        self.irr = self.isr = self.tmr = 0
        self.esr = self.esr_pending = 0
        self.lvt = [LVT_MASKED] * 6
        self.icr_low = self.icr_high = 0
        self.timer_initial = 0
        self.timer_divide = 0
        self.timer_start: float | None = None  # clock time of the last (re)base
        self.timer_base_ticks = 0  # ticks already counted at timer_start (a divide change rebases)
        self.timer_due: float | None = None
        self.timer_backlog = 0  # periodic expiries owed to the guest (see timer_expire)
        self.tsc_deadline = 0  # IA32_TSC_DEADLINE as the guest wrote it (0: disarmed)
        self.nmi_pending = False
        self.extint_pending = False

    def firmware_handoff(self) -> None:
        """The BSP state a PC BIOS leaves: APIC software-enabled in virtual wire mode.

        LINT0 is ExtINT (the 8259's INTR) and LINT1 NMI, so PIC interrupts reach the
        BSP before the guest programs its APIC, as they do after SeaBIOS.
        """
        self.svr = 0x1FF
        self.lvt[LVT_LINT0] = DM_EXTINT << 8
        self.lvt[LVT_LINT1] = DM_NMI << 8

    # --- state queries -------------------------------------------------------
    @property
    def hw_enabled(self) -> bool:
        return bool(self.base & APIC_BASE_ENABLE)

    @property
    def sw_enabled(self) -> bool:
        return bool(self.svr & SVR_ENABLE)

    @property
    def page(self) -> int:
        return self.base & APIC_BASE_ADDRESS_MASK

    def ppr(self) -> int:
        isrv = self.isr.bit_length() - 1
        if isrv < 0 or _vector_class(self.tpr) >= _vector_class(isrv):
            return self.tpr
        return isrv & 0xF0

    def deliverable_vector(self) -> int:
        """The highest IRR vector whose priority class beats the PPR, or -1."""
        irrv = self.irr.bit_length() - 1
        if irrv < 0 or _vector_class(irrv) <= _vector_class(self.ppr()):
            return -1
        return irrv

    def accepts_pic(self) -> bool:
        """Does the 8259's INTR reach this CPU (LINT0 unmasked ExtINT, or the APIC disabled)?"""
        if not self.hw_enabled:
            return True
        lint0 = self.lvt[LVT_LINT0]
        return not lint0 & LVT_MASKED and (lint0 >> 8) & 7 == DM_EXTINT

    def matches(self, logical: bool, destination: int) -> bool:
        if not self.hw_enabled:
            return False
        if destination == 0xFF:
            return True  # broadcast in both modes
        if not logical:
            return destination == self.apic_id
        ldr = self.ldr >> 24
        if self.dfr >> 28 == 0xF:  # flat model: one bit per APIC
            return bool(ldr & destination)
        # cluster model: cluster in the high nibble, members in the low
        return ldr >> 4 == destination >> 4 and bool(ldr & destination & 0xF)

    # --- interrupt acceptance and acknowledge --------------------------------
    def accept_fixed(self, vector: int, level: bool) -> bool:
        if vector < 16:
            self.error(ESR_RECEIVE_ILLEGAL_VECTOR)
            return False
        bit = 1 << vector
        self.irr |= bit
        if level:
            self.tmr |= bit
        else:
            self.tmr &= ~bit
        return True

    def error(self, bit: int) -> None:
        self.esr_pending |= bit
        lvt = self.lvt[LVT_ERROR]
        if not lvt & LVT_MASKED and lvt & 0xFF >= 16:
            self.irr |= 1 << (lvt & 0xFF)
            self.tmr &= ~(1 << (lvt & 0xFF))

    def acknowledge(self) -> int | None:
        vector = self.deliverable_vector()
        if vector < 0:
            return None
        bit = 1 << vector
        self.irr &= ~bit
        self.isr |= bit
        if self.timer_backlog:
            lvt = self.lvt[LVT_TIMER]
            if vector == lvt & 0xFF and lvt & LVT_TIMER_PERIODIC and not lvt & LVT_MASKED:
                self.timer_backlog -= 1
                self.irr |= bit  # the next owed tick, taken after this one's EOI
                self.tmr &= ~bit
        return vector

    def eoi(self) -> None:
        vector = self.isr.bit_length() - 1
        if vector < 0:
            return
        bit = 1 << vector
        self.isr &= ~bit
        if self.tmr & bit:  # TMR keeps the trigger mode until the vector is accepted again
            self.bus.eoi_broadcast(vector)

    # --- timer ---------------------------------------------------------------
    def timer_divisor(self) -> int:
        code = (self.timer_divide & 3) | ((self.timer_divide >> 1) & 4)
        return 1 << ((code + 1) & 7)

    def timer_elapsed(self, now: float) -> int:
        """Timer ticks counted since the initial count was written (started timers only)."""
        return self.timer_base_ticks + int((now - self.timer_start) * LAPIC_TIMER_HZ / self.timer_divisor())

    @property
    def tsc_deadline_mode(self) -> bool:
        return self.lvt[LVT_TIMER] & LVT_TIMER_MODE == LVT_TIMER_TSC_DEADLINE

    def set_tsc_deadline(self, value: int, due: float | None) -> None:
        """IA32_TSC_DEADLINE = ``value`` (0 disarms), expiring at clock time ``due``; ignored
        outside TSC-deadline mode (SDM vol. 3 11.5.4.1)."""
        if not self.tsc_deadline_mode:
            return
        self.tsc_deadline = value
        self.timer_due = due if value else None
        self.bus.timer_changed()

    def timer_current(self, now: float) -> int:
        if self.timer_start is None or self.tsc_deadline_mode:
            return 0
        elapsed = self.timer_elapsed(now)
        if self.lvt[LVT_TIMER] & LVT_TIMER_PERIODIC:
            return self.timer_initial - elapsed % self.timer_initial
        return max(0, self.timer_initial - elapsed)

    def _tick_time(self, ticks: int) -> float:
        """Clock time at which the timer has counted ``ticks`` in total."""
        return self.timer_start + (ticks - self.timer_base_ticks) * self.timer_divisor() / LAPIC_TIMER_HZ

    def _timer_rearm(self, now: float) -> None:
        """Set ``timer_due`` to the next expiry after ``now``."""
        if self.tsc_deadline_mode:
            return  # armed by set_tsc_deadline only
        if self.timer_start is None:
            self.timer_due = None
            return
        initial = self.timer_initial
        elapsed = self.timer_elapsed(now)
        if self.lvt[LVT_TIMER] & LVT_TIMER_PERIODIC:
            boundary = (elapsed // initial + 1) * initial
            due = self._tick_time(boundary)
            if due <= now:  # rounding put ``now`` on the boundary itself: that expiry is done
                due = self._tick_time(boundary + initial)
            self.timer_due = due
        else:
            due = self._tick_time(initial)
            self.timer_due = due if elapsed < initial and due > now else None

    def timer_expire(self, now: float) -> bool:
        """Advance past ``now``: True if an expiry happened and the LVT lets it interrupt.

        Periodic mode keeps count of expiries the guest did not get (a late ``poll()``,
        or the previous one still pending in IRR) and re-delivers them one at a time as
        the guest acknowledges the timer vector, as KVM re-injects lost PIT ticks: a
        kernel with a periodic tick counts jiffies per interrupt, and lost ticks make its
        clocksource watchdog reject the TSC. The backlog is bounded (TICK_BACKLOG_LIMIT_S).

        Only expiries a late poll skipped are owed. One that finds the previous tick still
        waiting in IRR merges into it, as on hardware and in KVM's LAPIC timer: the guest, not
        the VMM, is behind then, and feeding it owed ticks back to back (each needing its own
        interrupt window) kept a guest slower than its tick on ticks alone for good (Linux
        restored onto the HVF/WHPX fakes: a 0.5 s backlog that never drained, the serial
        interrupt starved below it).
        """
        if self.timer_due is None or now < self.timer_due:
            return False
        lvt = self.lvt[LVT_TIMER]
        missed = 0
        if self.tsc_deadline_mode:
            self.timer_due = None
            self.tsc_deadline = 0  # the MSR reads 0 once the deadline has passed
        elif lvt & LVT_TIMER_PERIODIC:
            period = self.timer_initial * self.timer_divisor() / LAPIC_TIMER_HZ
            missed = int((now - self.timer_due) / period)
            self._timer_rearm(now)
        else:
            self.timer_due = None
        if lvt & LVT_MASKED:
            return False
        vector = lvt & 0xFF
        if self.irr & (1 << vector):
            missed = 0  # the previous expiry has not been taken yet: this one merges into it
        if missed and lvt & LVT_TIMER_PERIODIC:
            limit = int(TICK_BACKLOG_LIMIT_S * LAPIC_TIMER_HZ / (self.timer_initial * self.timer_divisor()))
            self.timer_backlog = min(limit, self.timer_backlog + missed)
        return self.accept_fixed(vector, False)

    # --- registers -------------------------------------------------------------
    def read(self, offset: int, now: float) -> int:
        """A 32-bit read of the register at 16-byte-aligned ``offset``."""
        if offset == REG_ID:
            return self.apic_id << 24
        if offset == REG_VERSION:
            return LAPIC_VERSION
        if offset == REG_TPR:
            return self.tpr
        if offset in (REG_APR, REG_PPR):
            return self.ppr()
        if offset == REG_LDR:
            return self.ldr
        if offset == REG_DFR:
            return self.dfr
        if offset == REG_SVR:
            return self.svr
        if REG_ISR <= offset < REG_ESR:
            bank, chunk = divmod(offset - REG_ISR, 0x80)
            bits = (self.isr, self.tmr, self.irr)[bank]
            return (bits >> (32 * (chunk >> 4))) & 0xFFFF_FFFF
        if offset == REG_ESR:
            return self.esr
        if offset == REG_ICR_LOW:
            return self.icr_low  # delivery status always reads idle
        if offset == REG_ICR_HIGH:
            return self.icr_high
        if REG_LVT_TIMER <= offset <= REG_LVT_ERROR:
            return self.lvt[(offset - REG_LVT_TIMER) >> 4]
        if offset == REG_TIMER_INITIAL:
            return self.timer_initial
        if offset == REG_TIMER_CURRENT:
            return self.timer_current(now)
        if offset == REG_TIMER_DIVIDE:
            return self.timer_divide
        return 0

    def write(self, offset: int, value: int, now: float) -> None:
        """A 32-bit write of the register at 16-byte-aligned ``offset``."""
        if offset == REG_ID:
            self.apic_id = value >> 24
        elif offset == REG_TPR:
            self.tpr = value & 0xFF
        elif offset == REG_EOI:
            self.eoi()
        elif offset == REG_LDR:
            self.ldr = value & 0xFF00_0000
        elif offset == REG_DFR:
            self.dfr = (value & 0xF000_0000) | 0x0FFF_FFFF
        elif offset == REG_SVR:
            self.svr = value & 0x3FF
            if not self.sw_enabled:  # software disable masks every LVT entry
                self.lvt = [entry | LVT_MASKED for entry in self.lvt]
        elif offset == REG_ESR:
            self.esr, self.esr_pending = self.esr_pending, 0
        elif offset == REG_ICR_HIGH:
            self.icr_high = value & 0xFF00_0000
        elif offset == REG_ICR_LOW:
            self.icr_low = value & 0x000C_CFFF  # no delivery-status bit
            self._send_icr()
        elif REG_LVT_TIMER <= offset <= REG_LVT_ERROR:
            index = (offset - REG_LVT_TIMER) >> 4
            entry = value & LVT_WRITABLE[index]
            if index == LVT_TIMER and entry & LVT_TIMER_MODE == LVT_TIMER_MODE:
                entry &= ~LVT_TIMER_MODE  # the reserved mode 11b: taken as one-shot
            if not self.sw_enabled:
                entry |= LVT_MASKED
            if index == LVT_TIMER and (entry ^ self.lvt[index]) & LVT_TIMER_MODE:
                # a mode change disarms the timer (SDM vol. 3 11.5.4.1)
                self.timer_start, self.timer_due, self.tsc_deadline = None, None, 0
            self.lvt[index] = entry
            if index == LVT_TIMER:
                self.timer_backlog = 0
                self._timer_rearm(now)
                self.bus.timer_changed()
        elif offset == REG_TIMER_INITIAL:
            if self.tsc_deadline_mode:
                return  # ignored in TSC-deadline mode
            self.timer_initial = value & 0xFFFF_FFFF
            self.timer_start = now if self.timer_initial else None
            self.timer_base_ticks = 0
            self.timer_backlog = 0
            self._timer_rearm(now)
            self.bus.timer_changed()
        elif offset == REG_TIMER_DIVIDE:
            # keep the count reached so far: the new divisor applies from now on
            if self.timer_start is not None:
                self.timer_base_ticks = self.timer_elapsed(now)
                self.timer_start = now
            self.timer_divide = value & 0xB
            self.timer_backlog = 0
            if self.timer_start is not None:
                self._timer_rearm(now)
                self.bus.timer_changed()
        elif offset in (REG_VERSION, REG_APR, REG_PPR, REG_RRD, REG_TIMER_CURRENT) or REG_ISR <= offset < REG_ESR:
            pass  # read-only
        else:
            self.error(ESR_ILLEGAL_REGISTER)

    def _send_icr(self) -> None:
        low = self.icr_low
        mode = (low >> 8) & 7
        if mode == DM_INIT and not low & ICR_LEVEL_ASSERT and low & ICR_TRIGGER_LEVEL:
            return  # INIT level de-assert: only synchronises arbitration IDs
        if mode == DM_SMI:
            return  # no SMM
        vector = low & 0xFF
        if mode in (DM_FIXED, DM_LOWEST) and vector < 16:
            self.error(ESR_SEND_ILLEGAL_VECTOR)
            return
        message = ApicMessage(
            vector=vector,
            delivery_mode=mode,
            logical=bool(low & 0x800),
            destination=self.icr_high >> 24,
            level=False,  # IPIs are edge-triggered: the trigger bit only qualifies INIT de-assert
            shorthand=(low >> 18) & 3,
            source=self.index,
        )
        self.bus.send_ipi(self, message)


__all__ = [
    "LAPIC_TIMER_HZ", "LAPIC_VERSION", "LAPIC_DEFAULT_BASE", "LocalApic", "ApicBus",
    "DM_FIXED", "DM_LOWEST", "DM_NMI", "DM_INIT", "DM_SIPI", "DM_EXTINT",
]
