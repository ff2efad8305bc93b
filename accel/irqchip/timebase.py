"""One time base for the guest's TSC, the PIT and the local APIC timers.

The chip computes every counter from its ``clock`` (host seconds) at the moment the
guest looks, and a software CPU's RDTSC is the host TSC, so both run in real host
time. Two things keep the guest's view consistent:

* ``tsc_cpuid_leaves(tsc_hz)``: what a backend should report in CPUID leaves 0x15 and
  0x16 (with an Intel vendor string and a max basic leaf >= 0x16). Linux then takes
  the TSC frequency from CPUID (``native_calibrate_tsc``: "known frequency", no PIT
  calibration loop at all, no refinement) and the APIC timer period from the crystal
  (``lapic_timer_period``), instead of timing PIT reads. PIT calibration in a slow
  software CPU is what fails in QEMU TCG: ``pit_calibrate_tsc`` demands more than
  1000 port reads in 10 ms with no read taking 10x longer than the fastest, and
  ``quick_pit_calibrate`` needs each pair of reads within a few microseconds.
  Without these leaves the PIT here still answers exactly in host time (tests replay
  both Linux loops), but whether the loops' speed checks pass depends on the cost of
  a trapped port read.
* ``monotonic_raw``: CLOCK_MONOTONIC is slewed by NTP (up to 500 ppm) while the TSC is
  not; a backend that wants the PIT and APIC timer to agree with the TSC to the ppm
  passes ``clock=monotonic_raw`` and uses ``chip.clock`` for its own deadlines.
"""

from __future__ import annotations

import time
from fractions import Fraction

from pyvmm.accel.irqchip.chip import IrqchipError
from pyvmm.accel.irqchip.lapic import LAPIC_TIMER_HZ

# Linux computes ``crystal_khz * numerator`` in 32-bit unsigned arithmetic.
_NUMERATOR_LIMIT = 0xFFFF_FFFF // (LAPIC_TIMER_HZ // 1000)


def monotonic_raw() -> float:
    """Seconds of CLOCK_MONOTONIC_RAW (the TSC's rate, no NTP slewing)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC_RAW)


def tsc_ratio(tsc_hz: int) -> tuple[int, int]:
    """(numerator, denominator) with crystal * numerator / denominator ~= ``tsc_hz``.

    The crystal is the local APIC timer clock, ``LAPIC_TIMER_HZ``; the fraction is the
    closest one whose numerator keeps Linux's 32-bit product from overflowing.
    """
    if tsc_hz <= 0:
        raise IrqchipError(f"TSC frequency {tsc_hz} Hz must be positive")
    ratio = Fraction(tsc_hz, LAPIC_TIMER_HZ)
    max_denominator = max(1, int(_NUMERATOR_LIMIT / ratio))
    while True:
        approx = ratio.limit_denominator(max_denominator)
        if approx.numerator <= _NUMERATOR_LIMIT:
            return approx.numerator, approx.denominator
        max_denominator = max(1, max_denominator // 2)


def tsc_cpuid_leaves(tsc_hz: int) -> dict[int, tuple[int, int, int, int]]:
    """CPUID leaves 0x15 (TSC/crystal ratio, crystal Hz) and 0x16 (MHz) as (eax, ebx, ecx, edx)."""
    numerator, denominator = tsc_ratio(tsc_hz)
    mhz = max(1, round(tsc_hz / 1_000_000))
    bus_mhz = LAPIC_TIMER_HZ // 1_000_000
    return {
        0x15: (denominator, numerator, LAPIC_TIMER_HZ, 0),
        0x16: (mhz & 0xFFFF, mhz & 0xFFFF, bus_mhz & 0xFFFF, 0),
    }
