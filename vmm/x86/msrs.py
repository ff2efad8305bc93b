"""x86 model-specific register indices and the values Linux expects at its entry point.

The boot values follow Firecracker's ``create_boot_msr_entries``: the syscall
MSRs are cleared (the kernel programs them itself), the TSC starts at 0 and
MTRRs are enabled with write-back as the default memory type, so the kernel
does not mark all of RAM uncached.
"""

from __future__ import annotations

# --- indices (Intel SDM vol. 4) ------------------------------------------
MSR_IA32_TSC = 0x10
MSR_IA32_APIC_BASE = 0x1B
MSR_IA32_FEATURE_CONTROL = 0x3A
MSR_IA32_TSC_ADJUST = 0x3B
MSR_IA32_SPEC_CTRL = 0x48
MSR_IA32_UCODE_REV = 0x8B
MSR_MTRR_CAP = 0xFE
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MCG_CAP = 0x179
MSR_IA32_MCG_STATUS = 0x17A
MSR_IA32_PERF_STATUS = 0x198
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_PHYS_BASE0 = 0x200
MSR_MTRR_FIX64K_00000 = 0x250
MSR_IA32_CR_PAT = 0x277
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_X2APIC_BASE = 0x800  # the x2APIC register range is 0x800-0x8FF
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103
MSR_KVM_WALL_CLOCK_NEW = 0x4B564D00
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01

# --- bits ----------------------------------------------------------------
MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_DEF_TYPE_WRITE_BACK = 6
MTRR_DEF_TYPE_FIXED_ENABLE = 1 << 10
MTRR_DEF_TYPE_ENABLE = 1 << 11
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
#: the power-on value of IA32_PAT (WB, WT, UC-, UC repeated)
PAT_POWER_ON = 0x0007040600070406


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
