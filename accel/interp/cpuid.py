"""The CPUID table of the interpreter: what unicorn 2.1.4 really executes, and the TSC frequency.

The base is the engine's own answer (its Broadwell model, engine.CPU_MODEL, already
filtered by QEMU to what TCG implements), trimmed of what does not work here
(AVX and everything VEX-vector, x2APIC: the irqchip does not model it,
MONITOR/MWAIT, XSAVEC/XSAVES, PCID/INVPCID, performance counters) and extended
with leaves 0x15/0x16 so that Linux takes the TSC frequency from CPUID instead
of calibrating it against the PIT (which is unreliable under a software CPU).
"""

from __future__ import annotations

import time
from fractions import Fraction

from pyvmm.accel.interp.engine import helpers_redirected, host_tsc, scratch
from pyvmm.accel.x86 import CpuidEntry

_MAX_BASIC = 0x16
_INDEXED = {4, 7, 0xB, 0xD}


def _bit(*bits: int) -> int:
    mask = 0
    for b in bits:
        mask |= 1 << b
    return mask


# leaf 1 ECX: DTES64, MONITOR, DS-CPL, VMX, SMX, EST, TM2, FMA, xTPR, PDCM, PCID, x2APIC, OSXSAVE (dynamic,
# from CR4), AVX, F16C
LEAF1_ECX_REMOVE = _bit(2, 3, 4, 5, 6, 7, 8, 12, 14, 15, 17, 21, 27, 28, 29)
# leaf 1 ECX: TSC-deadline, served by the vCPU (IA32_TSC_DEADLINE) and the userspace LAPIC, where the
# helpers are redirected (without them a guest's deadline writes would be lost and its timer never fire)
LEAF1_ECX_ADD = _bit(24)
# leaf 7 EBX: AVX2, INVPCID, RTM, MPX, AVX-512 (16, 17, 21, 26-28, 30, 31), HLE, PT
LEAF7_EBX_REMOVE = _bit(4, 5, 10, 11, 14, 16, 17, 21, 25, 26, 27, 28, 30, 31)
OSXSAVE = 1 << 27


_tsc_hz: int | None = None


def tsc_hz() -> int:
    """The host TSC frequency (the guest's RDTSC is the host TSC), measured once per process.

    /proc/cpuinfo does not give it, so RDTSC (run in a scratch engine) is paired
    with time.monotonic at both ends of a 100 ms window; each end keeps the
    tightest of five brackets, so the result is within ~0.01% (rounded to kHz).
    """
    global _tsc_hz
    if _tsc_hz is None:

        def sample() -> tuple[float, int]:
            best = None
            for _ in range(5):
                before = time.monotonic_ns()
                cycles = host_tsc()
                after = time.monotonic_ns()
                if best is None or after - before < best[0]:
                    best = (after - before, (before + after) / 2, cycles)
            return best[1], best[2]

        t0, c0 = sample()
        time.sleep(0.1)
        t1, c1 = sample()
        _tsc_hz = max(1000, int(round((c1 - c0) / ((t1 - t0) / 1e9) / 1000)) * 1000)
    return _tsc_hz


def tsc_ratio(tsc: int, crystal_hz: int) -> tuple[int, int]:
    """EBX/EAX of leaf 0x15 so that crystal x EBX / EAX is the TSC frequency.

    Linux computes ``crystal_khz * EBX / EAX`` in 32-bit arithmetic, so
    ``crystal_khz * EBX`` must stay below 2**32: the best fraction under that
    numerator bound is taken (about 1 ppm off for a GHz crystal).
    """
    limit = (2**32 - 1) // max(1, crystal_hz // 1000)
    ratio = Fraction(tsc, crystal_hz)
    best = ratio.limit_denominator(max(1, int(limit / ratio)))
    while best.numerator > limit:
        best = ratio.limit_denominator(max(1, best.denominator - 1))
    return best.numerator, best.denominator


def supported_cpuid(lapic_timer_hz: int) -> list[CpuidEntry]:
    """The table for ``VmOps.supported_cpuid``: real engine behaviour plus TSC/crystal leaves."""
    probe = scratch()
    entries: list[CpuidEntry] = []
    native_max = probe.cpuid(0)[0]
    for leaf in range(0, _MAX_BASIC + 1):
        if leaf in _INDEXED:
            subleaves = {4: range(8), 7: range(1), 0xB: range(2), 0xD: range(3)}[leaf]
            for index in subleaves:
                regs = _trim(leaf, index, probe.cpuid(leaf, index) if leaf <= native_max else (0, 0, 0, 0))
                if leaf == 4 and index and not regs[0] & 0x1F:
                    break
                entries.append(CpuidEntry(leaf, index, *regs, indexed=True))
            continue
        regs = probe.cpuid(leaf) if leaf <= native_max else (0, 0, 0, 0)
        entries.append(CpuidEntry(leaf, 0, *_trim(leaf, 0, regs)))
    # TSC: leaf 0x15 = crystal (the LAPIC timer clock, which Linux also takes from here) x EBX / EAX
    tsc = tsc_hz()
    numerator, denominator = tsc_ratio(tsc, lapic_timer_hz)
    entries = [e for e in entries if e.function not in (0x15, 0x16)]
    entries.append(CpuidEntry(0x15, 0, denominator, numerator, lapic_timer_hz, 0))
    mhz = tsc // 1_000_000
    entries.append(CpuidEntry(0x16, 0, mhz, mhz, max(1, lapic_timer_hz // 1_000_000), 0))
    ext_max = probe.cpuid(0x80000000)[0]
    for leaf in range(0x80000000, min(ext_max, 0x80000008) + 1):
        regs = probe.cpuid(leaf)
        if leaf == 0x80000007:
            regs = (0, 0, 0, 1 << 8)  # invariant TSC: RDTSC is the host's TSC
        entries.append(CpuidEntry(leaf, 0, *regs))
    entries.sort(key=lambda e: (e.function, e.index))
    return entries


def _trim(leaf: int, index: int, regs: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    eax, ebx, ecx, edx = regs
    if leaf == 0:
        eax = _MAX_BASIC
    elif leaf == 1:
        ecx &= ~LEAF1_ECX_REMOVE
        if helpers_redirected():  # IA32_TSC_DEADLINE reaches the vCPU only through the redirected helpers
            ecx |= LEAF1_ECX_ADD
        ecx |= 1 << 31  # hypervisor
        edx |= 1 << 9  # APIC (xAPIC, memory-mapped)
        ebx &= 0x00FFFFFF  # initial APIC ID: set per vCPU
    elif leaf in (5, 6, 0xA):  # MONITOR/MWAIT, power management, performance counters
        eax = ebx = ecx = edx = 0
    elif leaf == 7 and index == 0:
        eax = 0
        ebx &= ~LEAF7_EBX_REMOVE
        # TSC_ADJUST: the engine has no such MSR, so it reads 0 and the TSC never moves under it,
        # which is exactly what Linux checks; with invariant TSC it lets Linux trust the TSC
        # without the jiffies watchdog (which a descheduled software CPU can trip).
        ebx |= 1 << 1
        ecx = edx = 0
    elif leaf == 0xD:
        if index == 0:
            eax &= 3  # x87 and SSE state only
            ebx = ecx = 576
            edx = 0
        elif index == 1:
            eax &= 1  # XSAVEOPT only: no XSAVEC, XGETBV1, XSAVES
            ebx = ecx = edx = 0
        else:
            eax = ebx = ecx = edx = 0
    return eax, ebx, ecx, edx
