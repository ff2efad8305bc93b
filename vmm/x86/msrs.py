"""The MSR values Linux expects at its entry point (the indices live in ``arch/x86/msrs.py``).

The boot values follow Firecracker's ``create_boot_msr_entries``: the syscall
MSRs are cleared (the kernel programs them itself), the TSC starts at 0 and
MTRRs are enabled with write-back as the default memory type, so the kernel
does not mark all of RAM uncached.
"""

from __future__ import annotations

from pyvmm.arch.x86.msrs import (
    MISC_ENABLE_FAST_STRING,
    MSR_CSTAR,
    MSR_IA32_MISC_ENABLE,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_TSC,
    MSR_KERNEL_GS_BASE,
    MSR_LSTAR,
    MSR_MTRR_DEF_TYPE,
    MSR_STAR,
    MSR_SYSCALL_MASK,
    MTRR_DEF_TYPE_ENABLE,
    MTRR_DEF_TYPE_WRITE_BACK,
)


def boot_msrs() -> dict[int, int]:
    """MSR values for the boot vCPU (and APs) as Linux expects them at its 64-bit or PVH entry."""
    return {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        # All of RAM write-back unless a range MTRR says otherwise (none is set).
        MSR_MTRR_DEF_TYPE: MTRR_DEF_TYPE_ENABLE | MTRR_DEF_TYPE_WRITE_BACK,
    }
