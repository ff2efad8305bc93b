"""cffi declarations (ABI mode) for Apple's Hypervisor.framework: the Intel (x86_64) and Apple Silicon (arm64) APIs.

Names and values are those of the SDK headers (hv.h, hv_vmx.h, hv_arch_vmx.h,
hv_arch_x86.h, hv_types.h, hv_error.h for Intel; hv_vm.h, hv_vcpu.h,
hv_vcpu_types.h, hv_gic.h for arm64), gathered with their sources in
shared/notes/hvf-whpx-headers.md sections 1 and 2; tests/unit/test_ffi_hvf.py
checks them. The two APIs share one library and some names (hv_vm_create,
hv_vcpu_create, hv_vcpu_run) with different signatures, so each has its own
``FFI`` (``intel`` and ``arm64``). Nothing is loaded until ``load()``:
importing this module works on every OS.
"""

from __future__ import annotations

from cffi import FFI

FRAMEWORK = "/System/Library/Frameworks/Hypervisor.framework/Hypervisor"

# --------------------------------------------------------------------------
# Intel (x86_64): hv.h, hv_vmx.h

intel = FFI()
intel.cdef(
    """
    typedef int32_t hv_return_t;          /* mach_error_t */
    typedef unsigned int hv_vcpuid_t;
    typedef const void *hv_uvaddr_t;
    typedef uint64_t hv_gpaddr_t;
    typedef uint64_t hv_memory_flags_t;
    typedef uint64_t hv_vm_options_t;
    typedef uint64_t hv_vcpu_options_t;
    typedef uint64_t hv_capability_t;
    typedef uint64_t hv_vmx_capability_t;
    typedef uint32_t hv_x86_reg_t;        /* an enum */

    hv_return_t hv_vm_create(hv_vm_options_t flags);
    hv_return_t hv_vm_destroy(void);
    hv_return_t hv_vm_map(hv_uvaddr_t uva, hv_gpaddr_t gpa, size_t size, hv_memory_flags_t flags);
    hv_return_t hv_vm_unmap(hv_gpaddr_t gpa, size_t size);
    hv_return_t hv_vm_protect(hv_gpaddr_t gpa, size_t size, hv_memory_flags_t flags);
    hv_return_t hv_vcpu_create(hv_vcpuid_t *vcpu, hv_vcpu_options_t flags);
    hv_return_t hv_vcpu_destroy(hv_vcpuid_t vcpu);
    hv_return_t hv_vcpu_run(hv_vcpuid_t vcpu);
    hv_return_t hv_vcpu_run_until(hv_vcpuid_t vcpu, uint64_t deadline);
    hv_return_t hv_vcpu_interrupt(hv_vcpuid_t *vcpus, unsigned int vcpu_count);
    hv_return_t hv_vcpu_read_register(hv_vcpuid_t vcpu, hv_x86_reg_t reg, uint64_t *value);
    hv_return_t hv_vcpu_write_register(hv_vcpuid_t vcpu, hv_x86_reg_t reg, uint64_t value);
    hv_return_t hv_vcpu_read_fpstate(hv_vcpuid_t vcpu, void *buffer, size_t size);
    hv_return_t hv_vcpu_write_fpstate(hv_vcpuid_t vcpu, void *buffer, size_t size);
    hv_return_t hv_vcpu_enable_native_msr(hv_vcpuid_t vcpu, uint32_t msr, bool enable);
    hv_return_t hv_vcpu_read_msr(hv_vcpuid_t vcpu, uint32_t msr, uint64_t *value);
    hv_return_t hv_vcpu_write_msr(hv_vcpuid_t vcpu, uint32_t msr, uint64_t value);
    hv_return_t hv_vcpu_invalidate_tlb(hv_vcpuid_t vcpu);
    hv_return_t hv_vcpu_get_exec_time(hv_vcpuid_t vcpu, uint64_t *time);
    hv_return_t hv_capability(hv_capability_t capability, uint64_t *value);
    hv_return_t hv_vmx_vcpu_read_vmcs(hv_vcpuid_t vcpu, uint32_t field, uint64_t *value);
    hv_return_t hv_vmx_vcpu_write_vmcs(hv_vcpuid_t vcpu, uint32_t field, uint64_t value);
    hv_return_t hv_vmx_read_capability(hv_vmx_capability_t field, uint64_t *value);
    hv_return_t hv_vmx_vcpu_set_apic_address(hv_vcpuid_t vcpu, hv_gpaddr_t gpa);
    """
)

# --------------------------------------------------------------------------
# Apple Silicon (arm64): hv_vm.h, hv_vcpu.h, hv_vcpu_types.h, hv_gic.h

arm64 = FFI()
arm64.cdef(
    """
    typedef int32_t hv_return_t;
    typedef uint64_t hv_vcpu_t;
    typedef uint64_t hv_ipa_t;
    typedef uint64_t hv_memory_flags_t;
    typedef struct hv_vm_config_s *hv_vm_config_t;
    typedef struct hv_vcpu_config_s *hv_vcpu_config_t;
    typedef struct hv_gic_config_s *hv_gic_config_t;
    typedef uint32_t hv_exit_reason_t;
    typedef uint32_t hv_reg_t;
    typedef uint16_t hv_sys_reg_t;       /* OS_ENUM(hv_sys_reg, uint16_t, ...) */
    typedef uint32_t hv_interrupt_type_t;
    typedef uint64_t hv_exception_syndrome_t;
    typedef uint64_t hv_exception_address_t;

    typedef struct {
        hv_exception_syndrome_t syndrome;
        hv_exception_address_t virtual_address;
        hv_ipa_t physical_address;
    } hv_vcpu_exit_exception_t;

    typedef struct {
        hv_exit_reason_t reason;
        hv_vcpu_exit_exception_t exception;
    } hv_vcpu_exit_t;

    hv_vm_config_t hv_vm_config_create(void);
    hv_return_t hv_vm_config_get_max_ipa_size(uint32_t *ipa_bit_length);
    hv_return_t hv_vm_config_get_default_ipa_size(uint32_t *ipa_bit_length);
    hv_return_t hv_vm_config_set_ipa_size(hv_vm_config_t config, uint32_t ipa_bit_length);
    hv_return_t hv_vm_get_max_vcpu_count(uint32_t *max_vcpu_count);
    hv_return_t hv_vm_create(hv_vm_config_t config);
    hv_return_t hv_vm_destroy(void);
    hv_return_t hv_vm_map(void *addr, hv_ipa_t ipa, size_t size, hv_memory_flags_t flags);
    hv_return_t hv_vm_unmap(hv_ipa_t ipa, size_t size);
    hv_return_t hv_vm_protect(hv_ipa_t ipa, size_t size, hv_memory_flags_t flags);
    hv_return_t hv_vcpu_create(hv_vcpu_t *vcpu, hv_vcpu_exit_t **exit, hv_vcpu_config_t config);
    hv_return_t hv_vcpu_destroy(hv_vcpu_t vcpu);
    hv_return_t hv_vcpu_get_reg(hv_vcpu_t vcpu, hv_reg_t reg, uint64_t *value);
    hv_return_t hv_vcpu_set_reg(hv_vcpu_t vcpu, hv_reg_t reg, uint64_t value);
    hv_return_t hv_vcpu_get_sys_reg(hv_vcpu_t vcpu, hv_sys_reg_t reg, uint64_t *value);
    hv_return_t hv_vcpu_set_sys_reg(hv_vcpu_t vcpu, hv_sys_reg_t reg, uint64_t value);
    hv_return_t hv_vcpu_get_pending_interrupt(hv_vcpu_t vcpu, hv_interrupt_type_t type, bool *pending);
    hv_return_t hv_vcpu_set_pending_interrupt(hv_vcpu_t vcpu, hv_interrupt_type_t type, bool pending);
    hv_return_t hv_vcpu_set_trap_debug_exceptions(hv_vcpu_t vcpu, bool value);
    hv_return_t hv_vcpu_run(hv_vcpu_t vcpu);
    hv_return_t hv_vcpus_exit(hv_vcpu_t *vcpus, uint32_t vcpu_count);
    hv_return_t hv_vcpu_get_vtimer_mask(hv_vcpu_t vcpu, bool *vtimer_is_masked);
    hv_return_t hv_vcpu_set_vtimer_mask(hv_vcpu_t vcpu, bool vtimer_is_masked);
    hv_return_t hv_vcpu_get_vtimer_offset(hv_vcpu_t vcpu, uint64_t *vtimer_offset);
    hv_return_t hv_vcpu_set_vtimer_offset(hv_vcpu_t vcpu, uint64_t vtimer_offset);
    hv_gic_config_t hv_gic_config_create(void);
    hv_return_t hv_gic_config_set_distributor_base(hv_gic_config_t config, hv_ipa_t distributor_base_address);
    hv_return_t hv_gic_config_set_redistributor_base(hv_gic_config_t config, hv_ipa_t redistributor_base_address);
    hv_return_t hv_gic_create(hv_gic_config_t gic_config);
    hv_return_t hv_gic_set_spi(uint32_t intid, bool level);
    hv_return_t hv_gic_get_distributor_size(size_t *distributor_size);
    hv_return_t hv_gic_get_redistributor_size(size_t *redistributor_size);
    """
)

# --------------------------------------------------------------------------
# hv_return_t (hv_error.h: err_common_hypervisor | N); compare ``rc & 0xffffffff``

HV_SUCCESS = 0
HV_ERROR = 0xFAE94001
HV_BUSY = 0xFAE94002
HV_BAD_ARGUMENT = 0xFAE94003
HV_ILLEGAL_GUEST_STATE = 0xFAE94004  # the arm64 header's; absent from the x86_64 hv_error.h read
HV_NO_RESOURCES = 0xFAE94005
HV_NO_DEVICE = 0xFAE94006
HV_DENIED = 0xFAE94007  # from macOS 11
HV_EXISTS = 0xFAE94008  # arm64, newer SDKs
HV_UNSUPPORTED = 0xFAE9400F
RETURN_NAMES = {value: name for name, value in globals().items() if name.startswith("HV_") and isinstance(value, int)
                and name not in ("HV_SUCCESS",)}  # fmt: skip

HV_MEMORY_READ, HV_MEMORY_WRITE, HV_MEMORY_EXEC = 1 << 0, 1 << 1, 1 << 2
HV_DEADLINE_FOREVER = (1 << 64) - 1
HV_VM_DEFAULT = 0
HV_VCPU_DEFAULT = 0


def return_text(rc: int) -> str:
    rc &= 0xFFFFFFFF
    name = RETURN_NAMES.get(rc)
    return f"{name} ({rc:#x})" if name else f"hv_return_t {rc:#x}"


# --------------------------------------------------------------------------
# Intel: hv_x86_reg_t (hv_arch_x86.h; note RSI, RDI before RSP, RBP, and CS SS DS ES FS GS)

X86_REGS = ("RIP", "RFLAGS", "RAX", "RCX", "RDX", "RBX", "RSI", "RDI", "RSP", "RBP",
            "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15",
            "CS", "SS", "DS", "ES", "FS", "GS", "IDT_BASE", "IDT_LIMIT", "GDT_BASE", "GDT_LIMIT",
            "LDTR", "LDT_BASE", "LDT_LIMIT", "LDT_AR", "TR", "TSS_BASE", "TSS_LIMIT", "TSS_AR",
            "CR0", "CR1", "CR2", "CR3", "CR4", "DR0", "DR1", "DR2", "DR3", "DR4", "DR5", "DR6", "DR7",
            "TPR", "XCR0")  # fmt: skip
HV_X86 = {name: value for value, name in enumerate(X86_REGS)}
HV_X86_REGISTERS_MAX = len(X86_REGS)

# hv_vmx_capability_t
HV_VMX_CAP_PINBASED, HV_VMX_CAP_PROCBASED, HV_VMX_CAP_PROCBASED2, HV_VMX_CAP_ENTRY, HV_VMX_CAP_EXIT = 0, 1, 2, 3, 4
HV_VMX_CAP_PREEMPTION_TIMER = 32

# VMCS field encodings (hv_arch_vmx.h): guest segment state, (selector, limit, access rights, base)
VMCS_GUEST_SEGMENTS = {
    "es": (0x0800, 0x4800, 0x4814, 0x6806), "cs": (0x0802, 0x4802, 0x4816, 0x6808),
    "ss": (0x0804, 0x4804, 0x4818, 0x680A), "ds": (0x0806, 0x4806, 0x481A, 0x680C),
    "fs": (0x0808, 0x4808, 0x481C, 0x680E), "gs": (0x080A, 0x480A, 0x481E, 0x6810),
    "ldt": (0x080C, 0x480C, 0x4820, 0x6812), "tr": (0x080E, 0x480E, 0x4822, 0x6814),
}  # fmt: skip
VMCS_GUEST_GDTR_LIMIT, VMCS_GUEST_GDTR_BASE = 0x4810, 0x6816
VMCS_GUEST_IDTR_LIMIT, VMCS_GUEST_IDTR_BASE = 0x4812, 0x6818
VMCS_GUEST_CR0, VMCS_GUEST_CR3, VMCS_GUEST_CR4 = 0x6800, 0x6802, 0x6804
VMCS_GUEST_DR7, VMCS_GUEST_RSP, VMCS_GUEST_RIP, VMCS_GUEST_RFLAGS = 0x681A, 0x681C, 0x681E, 0x6820
VMCS_GUEST_SYSENTER_ESP, VMCS_GUEST_SYSENTER_EIP, VMCS_GUEST_IA32_SYSENTER_CS = 0x6824, 0x6826, 0x482A
VMCS_GUEST_LINK_POINTER, VMCS_GUEST_IA32_PAT, VMCS_GUEST_IA32_EFER = 0x2800, 0x2804, 0x2806
VMCS_GUEST_INTERRUPTIBILITY, VMCS_GUEST_ACTIVITY_STATE = 0x4824, 0x4826
VMCS_CTRL_PIN_BASED, VMCS_CTRL_CPU_BASED, VMCS_CTRL_EXC_BITMAP = 0x4000, 0x4002, 0x4004
VMCS_CTRL_VMEXIT_CONTROLS, VMCS_CTRL_VMENTRY_CONTROLS = 0x400C, 0x4012
VMCS_CTRL_VMENTRY_IRQ_INFO, VMCS_CTRL_VMENTRY_EXC_ERROR, VMCS_CTRL_VMENTRY_INSTR_LEN = 0x4016, 0x4018, 0x401A
VMCS_CTRL_TPR_THRESHOLD, VMCS_CTRL_CPU_BASED2 = 0x401C, 0x401E
VMCS_CTRL_CR0_MASK, VMCS_CTRL_CR4_MASK, VMCS_CTRL_CR0_SHADOW, VMCS_CTRL_CR4_SHADOW = 0x6000, 0x6002, 0x6004, 0x6006
VMCS_CTRL_TSC_OFFSET = 0x2010
VMCS_RO_INSTR_ERROR, VMCS_RO_EXIT_REASON, VMCS_RO_VMEXIT_IRQ_INFO = 0x4400, 0x4402, 0x4404
VMCS_RO_VMEXIT_IRQ_ERROR, VMCS_RO_IDT_VECTOR_INFO, VMCS_RO_IDT_VECTOR_ERROR = 0x4406, 0x4408, 0x440A
VMCS_RO_VMEXIT_INSTR_LEN, VMCS_RO_VMX_INSTR_INFO = 0x440C, 0x440E
VMCS_RO_EXIT_QUALIFIC, VMCS_RO_GUEST_LIN_ADDR, VMCS_GUEST_PHYSICAL_ADDRESS = 0x6400, 0x640A, 0x2400

# control bits (hv_arch_vmx.h)
PIN_BASED_INTR, PIN_BASED_NMI, PIN_BASED_VIRTUAL_NMI = 1 << 0, 1 << 3, 1 << 5
CPU_BASED_IRQ_WND, CPU_BASED_TSC_OFFSET, CPU_BASED_HLT = 1 << 2, 1 << 3, 1 << 7
CPU_BASED_CR8_LOAD, CPU_BASED_CR8_STORE, CPU_BASED_TPR_SHADOW = 1 << 19, 1 << 20, 1 << 21
CPU_BASED_VIRTUAL_NMI_WND, CPU_BASED_UNCOND_IO, CPU_BASED_SECONDARY_CTLS = 1 << 22, 1 << 24, 1 << 31
CPU_BASED2_EPT, CPU_BASED2_RDTSCP, CPU_BASED2_UNRESTRICTED = 1 << 1, 1 << 3, 1 << 7
VMENTRY_GUEST_IA32E, VMENTRY_LOAD_EFER = 1 << 9, 1 << 15
VMEXIT_HOST_IA32E, VMEXIT_SAVE_EFER, VMEXIT_LOAD_EFER = 1 << 9, 1 << 20, 1 << 21
IRQ_INFO_EXT_IRQ, IRQ_INFO_NMI, IRQ_INFO_HARD_EXC = 0 << 8, 2 << 8, 3 << 8
IRQ_INFO_SOFT_IRQ, IRQ_INFO_PRIV_SOFT_EXC, IRQ_INFO_SOFT_EXC = 4 << 8, 5 << 8, 6 << 8
IRQ_INFO_TYPE_MASK, IRQ_INFO_ERROR_VALID, IRQ_INFO_VALID = 7 << 8, 1 << 11, 1 << 31
GUEST_INTRBILITY_STI_BLOCKING, GUEST_INTRBILITY_MOVSS_BLOCKING = 1 << 0, 1 << 1
GUEST_INTRBILITY_SMI_BLOCKING, GUEST_INTRBILITY_NMI_BLOCKING = 1 << 2, 1 << 3
# EPT-violation exit qualification (QEMU target/i386/hvf/vmcs.h; not in Apple's header)
EPT_VIOLATION_DATA_READ, EPT_VIOLATION_DATA_WRITE, EPT_VIOLATION_INST_FETCH = 1 << 0, 1 << 1, 1 << 2
EPT_VIOLATION_GLA_VALID, EPT_VIOLATION_XLAT_VALID = 1 << 7, 1 << 8

# VMX_REASON_* (hv_arch_vmx.h)
VMX_REASON_EXC_NMI, VMX_REASON_IRQ, VMX_REASON_TRIPLE_FAULT, VMX_REASON_INIT, VMX_REASON_SIPI = 0, 1, 2, 3, 4
VMX_REASON_IRQ_WND, VMX_REASON_VIRTUAL_NMI_WND, VMX_REASON_TASK, VMX_REASON_CPUID = 7, 8, 9, 10
VMX_REASON_HLT, VMX_REASON_INVLPG, VMX_REASON_RDPMC, VMX_REASON_RDTSC, VMX_REASON_VMCALL = 12, 14, 15, 16, 18
VMX_REASON_MOV_CR, VMX_REASON_MOV_DR, VMX_REASON_IO, VMX_REASON_RDMSR, VMX_REASON_WRMSR = 28, 29, 30, 31, 32
VMX_REASON_VMENTRY_GUEST, VMX_REASON_VMENTRY_MSR, VMX_REASON_MWAIT, VMX_REASON_MTF = 33, 34, 36, 37
VMX_REASON_MONITOR, VMX_REASON_PAUSE, VMX_REASON_VMENTRY_MC, VMX_REASON_TPR_THRESHOLD = 39, 40, 41, 43
VMX_REASON_APIC_ACCESS, VMX_REASON_EPT_VIOLATION, VMX_REASON_EPT_MISCONFIG = 44, 48, 49
VMX_REASON_RDTSCP, VMX_REASON_VMX_TIMER_EXPIRED, VMX_REASON_WBINVD, VMX_REASON_XSETBV = 51, 52, 54, 55
VMX_REASON_RDRAND, VMX_REASON_INVPCID, VMX_REASON_RDSEED, VMX_REASON_XSAVES, VMX_REASON_XRSTORS = 57, 58, 61, 63, 64

# I/O exit qualification (Intel SDM; QEMU target/i386/hvf/hvf.c)
IO_QUAL_SIZE_MASK, IO_QUAL_IN, IO_QUAL_STRING, IO_QUAL_REP, IO_QUAL_PORT_SHIFT = 0x7, 1 << 3, 1 << 4, 1 << 5, 16

# --------------------------------------------------------------------------
# arm64 (hv_vcpu_types.h)

HV_EXIT_REASON_CANCELED, HV_EXIT_REASON_EXCEPTION, HV_EXIT_REASON_VTIMER_ACTIVATED, HV_EXIT_REASON_UNKNOWN = 0, 1, 2, 3
HV_INTERRUPT_TYPE_IRQ, HV_INTERRUPT_TYPE_FIQ = 0, 1
HV_REG_X0, HV_REG_PC, HV_REG_FPCR, HV_REG_FPSR, HV_REG_CPSR = 0, 31, 32, 33, 34
HV_SYS_REG_MPIDR_EL1, HV_SYS_REG_SCTLR_EL1, HV_SYS_REG_ESR_EL1 = 0xC005, 0xC080, 0xC290
HV_SYS_REG_VBAR_EL1, HV_SYS_REG_CNTV_CTL_EL0, HV_SYS_REG_CNTV_CVAL_EL0 = 0xC600, 0xDF19, 0xDF1A


def load(api: FFI):
    """The framework through ``api`` (``intel`` or ``arm64``); macOS only."""
    return api.dlopen(FRAMEWORK)
