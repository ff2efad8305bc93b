"""ffi/hvf.py reproduces Apple's Hypervisor.framework headers (values from shared/notes/hvf-whpx-headers.md 1-2)."""

from pyvmm.ffi import hvf


def test_the_arm64_exit_structure_layout():
    """hv_vcpu_exit_t: reason u32, then the exception record at 8 (32 bytes in all, LP64)."""
    ffi = hvf.arm64
    assert ffi.sizeof("hv_vcpu_exit_exception_t") == 24
    assert ffi.sizeof("hv_vcpu_exit_t") == 32
    assert ffi.offsetof("hv_vcpu_exit_t", "reason") == 0 and ffi.offsetof("hv_vcpu_exit_t", "exception") == 8
    assert [ffi.offsetof("hv_vcpu_exit_exception_t", f) for f in ("syndrome", "virtual_address", "physical_address")] \
        == [0, 8, 16]
    assert ffi.sizeof("hv_sys_reg_t") == 2 and ffi.sizeof("hv_vcpu_t") == 8  # OS_ENUM(hv_sys_reg, uint16_t)


def test_intel_types_and_register_numbers():
    assert hvf.intel.sizeof("hv_vcpuid_t") == 4 and hvf.intel.sizeof("hv_return_t") == 4
    assert (hvf.HV_X86["RIP"], hvf.HV_X86["RAX"], hvf.HV_X86["RSI"], hvf.HV_X86["RSP"], hvf.HV_X86["CS"],
            hvf.HV_X86["ES"], hvf.HV_X86["CR0"], hvf.HV_X86["TPR"], hvf.HV_X86["XCR0"]) == (0, 2, 6, 8, 18, 21, 36, 49, 50)
    assert hvf.HV_X86_REGISTERS_MAX == 51


def test_vmcs_encodings_and_exit_reasons():
    assert hvf.VMCS_GUEST_SEGMENTS["cs"] == (0x0802, 0x4802, 0x4816, 0x6808)
    assert hvf.VMCS_GUEST_SEGMENTS["tr"] == (0x080E, 0x480E, 0x4822, 0x6814)
    assert (hvf.VMCS_RO_EXIT_REASON, hvf.VMCS_RO_EXIT_QUALIFIC, hvf.VMCS_RO_VMEXIT_INSTR_LEN,
            hvf.VMCS_GUEST_PHYSICAL_ADDRESS, hvf.VMCS_CTRL_VMENTRY_IRQ_INFO) == (0x4402, 0x6400, 0x440C, 0x2400, 0x4016)
    assert (hvf.VMX_REASON_IRQ_WND, hvf.VMX_REASON_HLT, hvf.VMX_REASON_IO, hvf.VMX_REASON_EPT_VIOLATION,
            hvf.VMX_REASON_XSETBV) == (7, 12, 30, 48, 55)
    assert hvf.CPU_BASED_HLT == 0x80 and hvf.CPU_BASED_IRQ_WND == 0x4 and hvf.CPU_BASED_SECONDARY_CTLS == 0x80000000
    assert hvf.IRQ_INFO_VALID | hvf.IRQ_INFO_EXT_IRQ | 0x30 == 0x80000030


def test_return_codes():
    assert hvf.HV_UNSUPPORTED == 0xFAE9400F and hvf.HV_DENIED == 0xFAE94007
    assert hvf.return_text(-85377009) == "HV_UNSUPPORTED (0xfae9400f)"  # hv_return_t is signed
    assert hvf.HV_DEADLINE_FOREVER == 0xFFFFFFFFFFFFFFFF
