"""cffi (ABI mode) declarations of the KVM userspace API for x86_64.

Every struct is laid out exactly as in ``<linux/kvm.h>`` / ``<asm/kvm.h>``;
every ioctl number is computed from ``ffi.sizeof`` of the declared type, so a
wrong declaration shows up as a wrong ioctl number (``tests/unit/test_ffi_kvm.py``
compares both against the C headers). No compiler is needed at install time.
"""

from __future__ import annotations

import cffi
from ioctl_opt import IOC, IOC_NONE, IOC_READ, IOC_WRITE

ffi = cffi.FFI()
ffi.cdef(
    """
    /* ---- libc ---- */
    int ioctl(int fd, unsigned long request, ...);

    /* ---- kvm_run ---- */
    struct kvm_debug_exit_arch {
        uint32_t exception;
        uint32_t pad;
        uint64_t pc;
        uint64_t dr6;
        uint64_t dr7;
    };

    struct kvm_run_hw { uint64_t hardware_exit_reason; };
    struct kvm_run_fail_entry { uint64_t hardware_entry_failure_reason; uint32_t cpu; };
    struct kvm_run_ex { uint32_t exception; uint32_t error_code; };
    struct kvm_run_io {
        uint8_t direction;
        uint8_t size;
        uint16_t port;
        uint32_t count;
        uint64_t data_offset;
    };
    struct kvm_run_debug { struct kvm_debug_exit_arch arch; };
    struct kvm_run_mmio {
        uint64_t phys_addr;
        uint8_t data[8];
        uint32_t len;
        uint8_t is_write;
    };
    struct kvm_run_hypercall {
        uint64_t nr;
        uint64_t args[6];
        uint64_t ret;
        uint32_t longmode;
        uint32_t pad;
    };
    struct kvm_run_internal {
        uint32_t suberror;
        uint32_t ndata;
        uint64_t data[16];
    };
    struct kvm_run_emulation_failure {
        uint32_t suberror;
        uint32_t ndata;
        uint64_t flags;
        uint8_t insn_size;
        uint8_t insn_bytes[15];
    };
    struct kvm_run_system_event {
        uint32_t type;
        uint32_t ndata;
        union {
            uint64_t flags;
            uint64_t data[16];
        };
    };

    struct kvm_run {
        uint8_t request_interrupt_window;
        uint8_t immediate_exit;
        uint8_t padding1[6];
        uint32_t exit_reason;
        uint8_t ready_for_interrupt_injection;
        uint8_t if_flag;
        uint16_t flags;
        uint64_t cr8;
        uint64_t apic_base;
        union {
            struct kvm_run_hw hw;
            struct kvm_run_fail_entry fail_entry;
            struct kvm_run_ex ex;
            struct kvm_run_io io;
            struct kvm_run_debug debug;
            struct kvm_run_mmio mmio;
            struct kvm_run_hypercall hypercall;
            struct kvm_run_internal internal;
            struct kvm_run_emulation_failure emulation_failure;
            struct kvm_run_system_event system_event;
            char padding[256];
        };
        uint64_t kvm_valid_regs;
        uint64_t kvm_dirty_regs;
        union {
            char padding[2048];
        } s;
    };

    /* ---- registers ---- */
    struct kvm_regs {
        uint64_t rax, rbx, rcx, rdx;
        uint64_t rsi, rdi, rsp, rbp;
        uint64_t r8, r9, r10, r11;
        uint64_t r12, r13, r14, r15;
        uint64_t rip, rflags;
    };

    struct kvm_segment {
        uint64_t base;
        uint32_t limit;
        uint16_t selector;
        uint8_t type;
        uint8_t present, dpl, db, s, l, g, avl;
        uint8_t unusable;
        uint8_t padding;
    };

    struct kvm_dtable {
        uint64_t base;
        uint16_t limit;
        uint16_t padding[3];
    };

    struct kvm_sregs {
        struct kvm_segment cs, ds, es, fs, gs, ss;
        struct kvm_segment tr, ldt;
        struct kvm_dtable gdt, idt;
        uint64_t cr0, cr2, cr3, cr4, cr8;
        uint64_t efer;
        uint64_t apic_base;
        uint64_t interrupt_bitmap[4];
    };

    struct kvm_fpu {
        uint8_t fpr[8][16];
        uint16_t fcw;
        uint16_t fsw;
        uint8_t ftwx;
        uint8_t pad1;
        uint16_t last_opcode;
        uint64_t last_ip;
        uint64_t last_dp;
        uint8_t xmm[16][16];
        uint32_t mxcsr;
        uint32_t pad2;
    };

    struct kvm_msr_entry {
        uint32_t index;
        uint32_t reserved;
        uint64_t data;
    };

    struct kvm_msrs {
        uint32_t nmsrs;
        uint32_t pad;
        struct kvm_msr_entry entries[];
    };

    struct kvm_msr_list {
        uint32_t nmsrs;
        uint32_t indices[];
    };

    struct kvm_cpuid_entry2 {
        uint32_t function;
        uint32_t index;
        uint32_t flags;
        uint32_t eax;
        uint32_t ebx;
        uint32_t ecx;
        uint32_t edx;
        uint32_t padding[3];
    };

    struct kvm_cpuid2 {
        uint32_t nent;
        uint32_t padding;
        struct kvm_cpuid_entry2 entries[];
    };

    struct kvm_lapic_state {
        char regs[1024];
    };

    /* VM-level device state: the in-kernel PIC pair and IOAPIC, the PIT, kvmclock */
    struct kvm_irqchip {
        uint32_t chip_id;
        uint32_t pad;
        char chip[512];  /* union of kvm_pic_state / kvm_ioapic_state, kept as bytes */
    };

    struct kvm_pit_channel_state {
        uint32_t count;
        uint16_t latched_count;
        uint8_t count_latched;
        uint8_t status_latched;
        uint8_t status;
        uint8_t read_state;
        uint8_t write_state;
        uint8_t write_latch;
        uint8_t rw_mode;
        uint8_t mode;
        uint8_t bcd;
        uint8_t gate;
        int64_t count_load_time;
    };

    struct kvm_pit_state2 {
        struct kvm_pit_channel_state channels[3];
        uint32_t flags;
        uint32_t reserved[9];
    };

    struct kvm_clock_data {
        uint64_t clock;
        uint32_t flags;
        uint32_t pad0;
        uint64_t realtime;
        uint64_t host_tsc;
        uint32_t pad[4];
    };

    struct kvm_vcpu_events {
        struct {
            uint8_t injected;
            uint8_t nr;
            uint8_t has_error_code;
            uint8_t pending;
            uint32_t error_code;
        } exception;
        struct {
            uint8_t injected;
            uint8_t nr;
            uint8_t soft;
            uint8_t shadow;
        } interrupt;
        struct {
            uint8_t injected;
            uint8_t pending;
            uint8_t masked;
            uint8_t pad;
        } nmi;
        uint32_t sipi_vector;
        uint32_t flags;
        struct {
            uint8_t smm;
            uint8_t pending;
            uint8_t smm_inside_nmi;
            uint8_t latched_init;
        } smi;
        struct {
            uint8_t pending;
        } triple_fault;
        uint8_t reserved[26];
        uint8_t exception_has_payload;
        uint64_t exception_payload;
    };

    struct kvm_mp_state {
        uint32_t mp_state;
    };

    struct kvm_xsave {
        uint32_t region[1024];
    };

    struct kvm_xcr {
        uint32_t xcr;
        uint32_t reserved;
        uint64_t value;
    };

    struct kvm_xcrs {
        uint32_t nr_xcrs;
        uint32_t flags;
        struct kvm_xcr xcrs[16];
        uint64_t padding[16];
    };

    struct kvm_guest_debug_arch {
        uint64_t debugreg[8];
    };

    struct kvm_guest_debug {
        uint32_t control;
        uint32_t pad;
        struct kvm_guest_debug_arch arch;
    };

    /* ---- VM ---- */
    struct kvm_userspace_memory_region {
        uint32_t slot;
        uint32_t flags;
        uint64_t guest_phys_addr;
        uint64_t memory_size;
        uint64_t userspace_addr;
    };

    struct kvm_dirty_log {
        uint32_t slot;
        uint32_t padding1;
        union {
            void *dirty_bitmap;
            uint64_t padding2;
        };
    };

    struct kvm_irq_level {
        union {
            uint32_t irq;
            int32_t status;
        };
        uint32_t level;
    };

    struct kvm_pit_config {
        uint32_t flags;
        uint32_t pad[15];
    };

    struct kvm_irqfd {
        uint32_t fd;
        uint32_t gsi;
        uint32_t flags;
        uint32_t resamplefd;
        uint8_t pad[16];
    };

    struct kvm_ioeventfd {
        uint64_t datamatch;
        uint64_t addr;
        uint32_t len;
        int32_t fd;
        uint32_t flags;
        uint8_t pad[36];
    };

    struct kvm_enable_cap {
        uint32_t cap;
        uint32_t flags;
        uint64_t args[4];
        uint8_t pad[64];
    };

    struct kvm_msi {
        uint32_t address_lo;
        uint32_t address_hi;
        uint32_t data;
        uint32_t flags;
        uint32_t devid;
        uint8_t pad[12];
    };

    struct kvm_irq_routing_irqchip {
        uint32_t irqchip;
        uint32_t pin;
    };

    struct kvm_irq_routing_msi {
        uint32_t address_lo;
        uint32_t address_hi;
        uint32_t data;
        union {
            uint32_t pad;
            uint32_t devid;
        };
    };

    struct kvm_irq_routing_entry {
        uint32_t gsi;
        uint32_t type;
        uint32_t flags;
        uint32_t pad;
        union {
            struct kvm_irq_routing_irqchip irqchip;
            struct kvm_irq_routing_msi msi;
            uint32_t pad[8];
        } u;
    };

    struct kvm_irq_routing {
        uint32_t nr;
        uint32_t flags;
        struct kvm_irq_routing_entry entries[];
    };
    """
)

#: libc of this process (ioctl); cffi releases the GIL around each call
libc = ffi.dlopen(None)

#: ``ioctl`` called through a fixed-argument prototype, for KVM_RUN on the hot
#: path: cffi prepares a variadic call anew each time (~0.4 us), and on the
#: x86-64 SysV ABI a call with integer arguments is the same either way.
ioctl_noarg = ffi.cast("int (*)(int, unsigned long, unsigned long)", ffi.addressof(libc, "ioctl"))

KVMIO = 0xAE
KVM_API_VERSION = 12


def _io(nr: int) -> int:
    return IOC(IOC_NONE, KVMIO, nr, 0)


def _ior(nr: int, ctype: str) -> int:
    return IOC(IOC_READ, KVMIO, nr, ffi.sizeof(ctype))


def _iow(nr: int, ctype: str) -> int:
    return IOC(IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return IOC(IOC_READ | IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype))


# ---- ioctls on /dev/kvm ----
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")

# ---- ioctls on a VM fd ----
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_GET_DIRTY_LOG = _iow(0x42, "struct kvm_dirty_log")
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "uint64_t")
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, "struct kvm_irq_level")
KVM_SET_GSI_ROUTING = _iow(0x6A, "struct kvm_irq_routing")
KVM_IRQFD = _iow(0x76, "struct kvm_irqfd")
KVM_CREATE_PIT2 = _iow(0x77, "struct kvm_pit_config")
KVM_IOEVENTFD = _iow(0x79, "struct kvm_ioeventfd")
KVM_ENABLE_CAP = _iow(0xA3, "struct kvm_enable_cap")
KVM_SIGNAL_MSI = _iow(0xA5, "struct kvm_msi")

# ---- ioctls on a vCPU fd ----
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
KVM_GET_IRQCHIP = _iowr(0x62, "struct kvm_irqchip")
KVM_SET_IRQCHIP = _ior(0x63, "struct kvm_irqchip")  # sic: <linux/kvm.h> declares it _IOR
KVM_SET_CLOCK = _iow(0x7B, "struct kvm_clock_data")
KVM_GET_CLOCK = _ior(0x7C, "struct kvm_clock_data")
KVM_GET_PIT2 = _ior(0x9F, "struct kvm_pit_state2")
KVM_SET_PIT2 = _iow(0xA0, "struct kvm_pit_state2")
KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
KVM_GET_CPUID2 = _iowr(0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
KVM_SET_GUEST_DEBUG = _iow(0x9B, "struct kvm_guest_debug")
KVM_GET_VCPU_EVENTS = _ior(0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _iow(0xA0, "struct kvm_vcpu_events")
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, "struct kvm_xsave")
KVM_SET_XSAVE = _iow(0xA5, "struct kvm_xsave")
KVM_GET_XCRS = _ior(0xA6, "struct kvm_xcrs")
KVM_SET_XCRS = _iow(0xA7, "struct kvm_xcrs")
KVM_KVMCLOCK_CTRL = _io(0xAD)

# ---- exit reasons (kvm_run.exit_reason) ----
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_OSI = 18
KVM_EXIT_WATCHDOG = 21
KVM_EXIT_EPR = 23
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_AP_RESET_HOLD = 32
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_XEN = 34
KVM_EXIT_NOTIFY = 37

EXIT_REASON_NAMES = {value: name for name, value in globals().items() if name.startswith("KVM_EXIT_")}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# ---- internal-error suberrors ----
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

# ---- system event types ----
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
KVM_SYSTEM_EVENT_SEV_TERM = 6

# ---- capabilities (KVM_CHECK_EXTENSION) ----
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_SET_GUEST_DEBUG2 = 195  # the KVM_GUESTDBG_* flags this KVM takes
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_IOEVENTFD = 36
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_EXIT_ON_EMULATION_FAILURE = 204
KVM_CAP_XSAVE2 = 208

# ---- flags ----
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_PIT_SPEAKER_DUMMY = 1
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_BLOCKIRQ = 0x00100000

# ---- vCPU multiprocessing states (kvm_mp_state.mp_state) ----
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

# ---- kvm_vcpu_events.flags ----
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008
KVM_VCPUEVENT_VALID_PAYLOAD = 0x00000010
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x00000020
