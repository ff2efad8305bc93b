"""CPUID 0x15/0x16 as Linux's native_calibrate_tsc() and cpu_khz_from_cpuid() read them."""

import pytest

from pyvmm.accel.irqchip import LAPIC_TIMER_HZ, IrqchipError
from pyvmm.accel.irqchip.timebase import monotonic_raw, tsc_cpuid_leaves

U32 = 0xFFFF_FFFF


def linux_native_calibrate_tsc(leaves, hz=250):
    """The arithmetic of arch/x86/kernel/tsc.c (6.1), in unsigned 32-bit ints."""
    eax_denominator, ebx_numerator, ecx_hz, _ = leaves[0x15]
    assert ebx_numerator and eax_denominator
    crystal_khz = ecx_hz // 1000
    lapic_timer_period = (crystal_khz * 1000 & U32) // hz
    tsc_khz = (crystal_khz * ebx_numerator & U32) // eax_denominator
    return tsc_khz, lapic_timer_period, crystal_khz * ebx_numerator


@pytest.mark.parametrize("tsc_hz", [1_000_000_000, 2_095_078_000, 2_500_000_000, 3_399_999_123, 5_200_000_000])
def test_linux_reads_the_tsc_frequency_and_apic_timer_period(tsc_hz):
    leaves = tsc_cpuid_leaves(tsc_hz)
    tsc_khz, lapic_timer_period, product = linux_native_calibrate_tsc(leaves)
    assert product <= U32  # no 32-bit overflow in Linux's multiplication
    assert abs(tsc_khz - tsc_hz / 1000) <= 1 + tsc_hz / 1000 * 1e-6
    assert lapic_timer_period == LAPIC_TIMER_HZ // 250  # APIC ticks per jiffy, no calibration
    base_mhz = leaves[0x16][0]
    assert base_mhz == round(tsc_hz / 1e6)  # cpu_khz_from_cpuid(): within Linux's 10% check


def test_bad_frequency_and_raw_clock():
    with pytest.raises(IrqchipError, match="TSC frequency 0 Hz"):
        tsc_cpuid_leaves(0)
    first = monotonic_raw()
    assert monotonic_raw() >= first
