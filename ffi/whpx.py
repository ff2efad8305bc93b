"""cffi declarations (ABI mode) for the Windows Hypervisor Platform: WinHvPlatform.dll and WinHvEmulation.dll.

Names, values and layouts are those of Microsoft's headers WinHvPlatformDefs.h,
WinHvPlatform.h and WinHvEmulation.h (MicrosoftDocs/Virtualization-Documentation,
2025; crosvm's vendored copies and bindgen layout tests agree), gathered with
their sources in shared/notes/hvf-whpx-headers.md; tests/unit/test_ffi_whpx.py
checks every size and offset below against the header values.

Bitfield unions (segment attributes, execution state, access infos, the
interrupt registers) are declared as their plain integer and decoded with the
masks below: the C compiler's bitfield order is not cffi's to choose.
``WHV_REGISTER_VALUE`` is 16-byte aligned in the header (DECLSPEC_ALIGN(16));
cffi cannot express that, so arrays of it must come from ``new_register_values``
(16-byte aligned). Nothing is loaded until ``load()``: importing this module
works on every OS.
"""

from __future__ import annotations

from cffi import FFI

ffi = FFI()
ffi.cdef(
    """
    typedef int32_t HRESULT;
    typedef void *WHV_PARTITION_HANDLE;
    typedef void *WHV_EMULATOR_HANDLE;
    typedef uint64_t WHV_GUEST_PHYSICAL_ADDRESS;
    typedef uint64_t WHV_GUEST_VIRTUAL_ADDRESS;
    typedef uint32_t WHV_CAPABILITY_CODE;
    typedef uint32_t WHV_PARTITION_PROPERTY_CODE;
    typedef uint32_t WHV_MAP_GPA_RANGE_FLAGS;
    typedef uint32_t WHV_TRANSLATE_GVA_FLAGS;
    typedef uint32_t WHV_REGISTER_NAME;
    typedef uint32_t WHV_RUN_VP_EXIT_REASON;

    typedef struct { uint64_t Low64; uint64_t High64; } WHV_UINT128;

    typedef struct {
        uint64_t Base;
        uint32_t Limit;
        uint16_t Selector;
        uint16_t Attributes;   /* SegmentType 0-3, NonSystemSegment 4, DPL 5-6, Present 7, Available 12, Long 13, Default 14, Granularity 15 */
    } WHV_X64_SEGMENT_REGISTER;

    typedef struct {
        uint16_t Pad[3];
        uint16_t Limit;
        uint64_t Base;
    } WHV_X64_TABLE_REGISTER;

    typedef union {
        WHV_UINT128 Reg128;
        uint64_t Reg64;
        uint32_t Reg32;
        uint16_t Reg16;
        uint8_t Reg8;
        WHV_X64_SEGMENT_REGISTER Segment;
        WHV_X64_TABLE_REGISTER Table;
    } WHV_REGISTER_VALUE;

    typedef struct {
        uint16_t ExecutionState; /* Cpl 0-1, Cr0Pe 2, Cr0Am 3, EferLma 4, DebugActive 5, InterruptionPending 6, InterruptShadow 12 */
        uint8_t InstructionLengthCr8; /* InstructionLength bits 0-3, Cr8 bits 4-7 */
        uint8_t Reserved;
        uint32_t Reserved2;
        WHV_X64_SEGMENT_REGISTER Cs;
        uint64_t Rip;
        uint64_t Rflags;
    } WHV_VP_EXIT_CONTEXT;

    typedef struct {
        uint8_t InstructionByteCount;
        uint8_t Reserved[3];
        uint8_t InstructionBytes[16];
        uint32_t AccessInfo;  /* AccessType 0-1, GpaUnmapped 2, GvaValid 3 */
        uint64_t Gpa;
        uint64_t Gva;
    } WHV_MEMORY_ACCESS_CONTEXT;

    typedef struct {
        uint8_t InstructionByteCount;
        uint8_t Reserved[3];
        uint8_t InstructionBytes[16];
        uint32_t AccessInfo;  /* IsWrite 0, AccessSize 1-3, StringOp 4, RepPrefix 5 */
        uint16_t PortNumber;
        uint16_t Reserved2[3];
        uint64_t Rax;
        uint64_t Rcx;
        uint64_t Rsi;
        uint64_t Rdi;
        WHV_X64_SEGMENT_REGISTER Ds;
        WHV_X64_SEGMENT_REGISTER Es;
    } WHV_X64_IO_PORT_ACCESS_CONTEXT;

    typedef struct {
        uint32_t AccessInfo;  /* IsWrite 0 */
        uint32_t MsrNumber;
        uint64_t Rax;
        uint64_t Rdx;
    } WHV_X64_MSR_ACCESS_CONTEXT;

    typedef struct {
        uint64_t Rax;
        uint64_t Rcx;
        uint64_t Rdx;
        uint64_t Rbx;
        uint64_t DefaultResultRax;
        uint64_t DefaultResultRcx;
        uint64_t DefaultResultRdx;
        uint64_t DefaultResultRbx;
    } WHV_X64_CPUID_ACCESS_CONTEXT;

    typedef struct {
        uint8_t InstructionByteCount;
        uint8_t Reserved[3];
        uint8_t InstructionBytes[16];
        uint32_t ExceptionInfo;  /* ErrorCodeValid 0, SoftwareException 1 */
        uint8_t ExceptionType;
        uint8_t Reserved2[3];
        uint32_t ErrorCode;
        uint64_t ExceptionParameter;
    } WHV_VP_EXCEPTION_CONTEXT;

    typedef struct { uint32_t DeliverableType; } WHV_X64_INTERRUPTION_DELIVERABLE_CONTEXT;
    typedef struct { uint32_t CancelReason; } WHV_RUN_VP_CANCELED_CONTEXT;
    typedef struct { uint32_t FeatureCode; uint32_t Reserved; uint64_t FeatureParameter; } WHV_X64_UNSUPPORTED_FEATURE_CONTEXT;
    typedef struct { uint32_t InterruptVector; } WHV_X64_APIC_EOI_CONTEXT;
    typedef struct { uint64_t ApicIcr; } WHV_X64_APIC_INIT_SIPI_CONTEXT;

    typedef struct {
        uint64_t Rax, Rbx, Rcx, Rdx, R8, Rsi, Rdi, Reserved0;
        WHV_UINT128 XmmRegisters[6];
        uint64_t Reserved1[2];
    } WHV_HYPERCALL_CONTEXT;

    typedef struct {
        WHV_RUN_VP_EXIT_REASON ExitReason;
        uint32_t Reserved;
        WHV_VP_EXIT_CONTEXT VpContext;
        union {
            WHV_MEMORY_ACCESS_CONTEXT MemoryAccess;
            WHV_X64_IO_PORT_ACCESS_CONTEXT IoPortAccess;
            WHV_X64_MSR_ACCESS_CONTEXT MsrAccess;
            WHV_X64_CPUID_ACCESS_CONTEXT CpuidAccess;
            WHV_VP_EXCEPTION_CONTEXT VpException;
            WHV_X64_INTERRUPTION_DELIVERABLE_CONTEXT InterruptWindow;
            WHV_X64_UNSUPPORTED_FEATURE_CONTEXT UnsupportedFeature;
            WHV_RUN_VP_CANCELED_CONTEXT CancelReason;
            WHV_X64_APIC_EOI_CONTEXT ApicEoi;
            WHV_X64_APIC_INIT_SIPI_CONTEXT ApicInitSipi;
            WHV_HYPERCALL_CONTEXT Hypercall;
            uint64_t AsUINT64[22];
        };
    } WHV_RUN_VP_EXIT_CONTEXT;

    typedef struct {
        uint64_t TypeModes;  /* Type 0-7, DestinationMode 8-11, TriggerMode 12-15 */
        uint32_t Destination;
        uint32_t Vector;
    } WHV_INTERRUPT_CONTROL;

    typedef struct {
        uint8_t Direction;
        uint16_t Port;
        uint16_t AccessSize;
        uint32_t Data;
    } WHV_EMULATOR_IO_ACCESS_INFO;

    typedef struct {
        uint64_t GpaAddress;
        uint8_t Direction;
        uint8_t AccessSize;
        uint8_t Data[8];
    } WHV_EMULATOR_MEMORY_ACCESS_INFO;

    typedef uint32_t WHV_EMULATOR_STATUS;
    typedef uint32_t WHV_TRANSLATE_GVA_RESULT_CODE;
    typedef struct { WHV_TRANSLATE_GVA_RESULT_CODE ResultCode; uint32_t Reserved; } WHV_TRANSLATE_GVA_RESULT;

    typedef HRESULT (*WHV_EMULATOR_IO_PORT_CALLBACK)(void *Context, WHV_EMULATOR_IO_ACCESS_INFO *IoAccess);
    typedef HRESULT (*WHV_EMULATOR_MEMORY_CALLBACK)(void *Context, WHV_EMULATOR_MEMORY_ACCESS_INFO *MemoryAccess);
    typedef HRESULT (*WHV_EMULATOR_GET_VIRTUAL_PROCESSOR_REGISTERS_CALLBACK)(void *Context,
        const WHV_REGISTER_NAME *RegisterNames, uint32_t RegisterCount, WHV_REGISTER_VALUE *RegisterValues);
    typedef HRESULT (*WHV_EMULATOR_SET_VIRTUAL_PROCESSOR_REGISTERS_CALLBACK)(void *Context,
        const WHV_REGISTER_NAME *RegisterNames, uint32_t RegisterCount, const WHV_REGISTER_VALUE *RegisterValues);
    typedef HRESULT (*WHV_EMULATOR_TRANSLATE_GVA_PAGE_CALLBACK)(void *Context, WHV_GUEST_VIRTUAL_ADDRESS Gva,
        WHV_TRANSLATE_GVA_FLAGS TranslateFlags, WHV_TRANSLATE_GVA_RESULT_CODE *TranslationResult,
        WHV_GUEST_PHYSICAL_ADDRESS *Gpa);

    typedef struct {
        uint32_t Size;
        uint32_t Reserved;
        WHV_EMULATOR_IO_PORT_CALLBACK WHvEmulatorIoPortCallback;
        WHV_EMULATOR_MEMORY_CALLBACK WHvEmulatorMemoryCallback;
        WHV_EMULATOR_GET_VIRTUAL_PROCESSOR_REGISTERS_CALLBACK WHvEmulatorGetVirtualProcessorRegisters;
        WHV_EMULATOR_SET_VIRTUAL_PROCESSOR_REGISTERS_CALLBACK WHvEmulatorSetVirtualProcessorRegisters;
        WHV_EMULATOR_TRANSLATE_GVA_PAGE_CALLBACK WHvEmulatorTranslateGvaPage;
    } WHV_EMULATOR_CALLBACKS;

    /* WinHvPlatform.h */
    HRESULT WHvGetCapability(WHV_CAPABILITY_CODE CapabilityCode, void *CapabilityBuffer,
                             uint32_t CapabilityBufferSizeInBytes, uint32_t *WrittenSizeInBytes);
    HRESULT WHvCreatePartition(WHV_PARTITION_HANDLE *Partition);
    HRESULT WHvSetupPartition(WHV_PARTITION_HANDLE Partition);
    HRESULT WHvDeletePartition(WHV_PARTITION_HANDLE Partition);
    HRESULT WHvGetPartitionProperty(WHV_PARTITION_HANDLE Partition, WHV_PARTITION_PROPERTY_CODE PropertyCode,
                                    void *PropertyBuffer, uint32_t PropertyBufferSizeInBytes, uint32_t *WrittenSizeInBytes);
    HRESULT WHvSetPartitionProperty(WHV_PARTITION_HANDLE Partition, WHV_PARTITION_PROPERTY_CODE PropertyCode,
                                    const void *PropertyBuffer, uint32_t PropertyBufferSizeInBytes);
    HRESULT WHvMapGpaRange(WHV_PARTITION_HANDLE Partition, void *SourceAddress, WHV_GUEST_PHYSICAL_ADDRESS GuestAddress,
                           uint64_t SizeInBytes, WHV_MAP_GPA_RANGE_FLAGS Flags);
    HRESULT WHvUnmapGpaRange(WHV_PARTITION_HANDLE Partition, WHV_GUEST_PHYSICAL_ADDRESS GuestAddress, uint64_t SizeInBytes);
    HRESULT WHvTranslateGva(WHV_PARTITION_HANDLE Partition, uint32_t VpIndex, WHV_GUEST_VIRTUAL_ADDRESS Gva,
                            WHV_TRANSLATE_GVA_FLAGS TranslateFlags, WHV_TRANSLATE_GVA_RESULT *TranslationResult,
                            WHV_GUEST_PHYSICAL_ADDRESS *Gpa);
    HRESULT WHvCreateVirtualProcessor(WHV_PARTITION_HANDLE Partition, uint32_t VpIndex, uint32_t Flags);
    HRESULT WHvDeleteVirtualProcessor(WHV_PARTITION_HANDLE Partition, uint32_t VpIndex);
    HRESULT WHvRunVirtualProcessor(WHV_PARTITION_HANDLE Partition, uint32_t VpIndex, void *ExitContext,
                                   uint32_t ExitContextSizeInBytes);
    HRESULT WHvCancelRunVirtualProcessor(WHV_PARTITION_HANDLE Partition, uint32_t VpIndex, uint32_t Flags);
    HRESULT WHvGetVirtualProcessorRegisters(WHV_PARTITION_HANDLE Partition, uint32_t VpIndex,
                                            const WHV_REGISTER_NAME *RegisterNames, uint32_t RegisterCount,
                                            WHV_REGISTER_VALUE *RegisterValues);
    HRESULT WHvSetVirtualProcessorRegisters(WHV_PARTITION_HANDLE Partition, uint32_t VpIndex,
                                            const WHV_REGISTER_NAME *RegisterNames, uint32_t RegisterCount,
                                            const WHV_REGISTER_VALUE *RegisterValues);
    HRESULT WHvRequestInterrupt(WHV_PARTITION_HANDLE Partition, const WHV_INTERRUPT_CONTROL *Interrupt,
                                uint32_t InterruptControlSize);
    HRESULT WHvQueryGpaRangeDirtyBitmap(WHV_PARTITION_HANDLE Partition, WHV_GUEST_PHYSICAL_ADDRESS GuestAddress,
                                        uint64_t RangeSizeInBytes, uint64_t *Bitmap, uint32_t BitmapSizeInBytes);

    /* WinHvEmulation.h */
    HRESULT WHvEmulatorCreateEmulator(const WHV_EMULATOR_CALLBACKS *Callbacks, WHV_EMULATOR_HANDLE *Emulator);
    HRESULT WHvEmulatorDestroyEmulator(WHV_EMULATOR_HANDLE Emulator);
    HRESULT WHvEmulatorTryIoEmulation(WHV_EMULATOR_HANDLE Emulator, void *Context, const WHV_VP_EXIT_CONTEXT *VpContext,
                                      const WHV_X64_IO_PORT_ACCESS_CONTEXT *IoInstructionContext,
                                      WHV_EMULATOR_STATUS *EmulatorReturnStatus);
    HRESULT WHvEmulatorTryMmioEmulation(WHV_EMULATOR_HANDLE Emulator, void *Context, const WHV_VP_EXIT_CONTEXT *VpContext,
                                        const WHV_MEMORY_ACCESS_CONTEXT *MmioInstructionContext,
                                        WHV_EMULATOR_STATUS *EmulatorReturnStatus);
    """
)

PLATFORM_DLL = "WinHvPlatform.dll"
EMULATION_DLL = "WinHvEmulation.dll"

# --- WHV_CAPABILITY_CODE -------------------------------------------------------
WHvCapabilityCodeHypervisorPresent = 0x00000000
WHvCapabilityCodeFeatures = 0x00000001
WHvCapabilityCodeExtendedVmExits = 0x00000002
WHvCapabilityCodeProcessorVendor = 0x00001000
WHvCapabilityCodeProcessorFeatures = 0x00001001
WHvCapabilityCodeProcessorXsaveFeatures = 0x00001003
WHvCapabilityCodeProcessorClockFrequency = 0x00001004
#: WHV_CAPABILITY_FEATURES bits
WHV_CAPABILITY_FEATURE_LOCAL_APIC_EMULATION = 1 << 1
WHV_CAPABILITY_FEATURE_DIRTY_PAGE_TRACKING = 1 << 3
#: WHV_EXTENDED_VM_EXITS bits
WHV_EXTENDED_VM_EXIT_X64_CPUID = 1 << 0
WHV_EXTENDED_VM_EXIT_X64_MSR = 1 << 1
WHV_EXTENDED_VM_EXIT_EXCEPTION = 1 << 2

# --- WHV_PARTITION_PROPERTY_CODE ----------------------------------------------
WHvPartitionPropertyCodeExtendedVmExits = 0x00000001
WHvPartitionPropertyCodeExceptionExitBitmap = 0x00000002
WHvPartitionPropertyCodeProcessorFeatures = 0x00001001
WHvPartitionPropertyCodeCpuidExitList = 0x00001003
WHvPartitionPropertyCodeCpuidResultList = 0x00001004
WHvPartitionPropertyCodeLocalApicEmulationMode = 0x00001005
WHvPartitionPropertyCodeProcessorXsaveFeatures = 0x00001006
WHvPartitionPropertyCodeProcessorCount = 0x00001FFF
WHvX64LocalApicEmulationModeNone = 0

# --- WHV_MAP_GPA_RANGE_FLAGS ---------------------------------------------------
WHvMapGpaRangeFlagNone = 0x0
WHvMapGpaRangeFlagRead = 0x1
WHvMapGpaRangeFlagWrite = 0x2
WHvMapGpaRangeFlagExecute = 0x4
WHvMapGpaRangeFlagTrackDirtyPages = 0x8

# --- WHV_RUN_VP_EXIT_REASON (x64) ----------------------------------------------
WHvRunVpExitReasonNone = 0x00000000
WHvRunVpExitReasonMemoryAccess = 0x00000001
WHvRunVpExitReasonX64IoPortAccess = 0x00000002
WHvRunVpExitReasonUnrecoverableException = 0x00000004
WHvRunVpExitReasonInvalidVpRegisterValue = 0x00000005
WHvRunVpExitReasonUnsupportedFeature = 0x00000006
WHvRunVpExitReasonX64InterruptWindow = 0x00000007
WHvRunVpExitReasonX64Halt = 0x00000008
WHvRunVpExitReasonX64ApicEoi = 0x00000009
WHvRunVpExitReasonX64MsrAccess = 0x00001000
WHvRunVpExitReasonX64Cpuid = 0x00001001
WHvRunVpExitReasonException = 0x00001002
WHvRunVpExitReasonX64Rdtsc = 0x00001003
WHvRunVpExitReasonX64ApicSmiTrap = 0x00001004
WHvRunVpExitReasonHypercall = 0x00001005
WHvRunVpExitReasonX64ApicInitSipiTrap = 0x00001006
WHvRunVpExitReasonX64ApicWriteTrap = 0x00001007
WHvRunVpExitReasonCanceled = 0x00002001
WHvRunVpCancelReasonUser = 0

# --- WHV_REGISTER_NAME (x64) ----------------------------------------------------
WHV_GPR_NAMES = ("Rax", "Rcx", "Rdx", "Rbx", "Rsp", "Rbp", "Rsi", "Rdi",
                 "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15")  # fmt: skip
WHvX64RegisterRax, WHvX64RegisterRcx, WHvX64RegisterRdx, WHvX64RegisterRbx = 0x00, 0x01, 0x02, 0x03
WHvX64RegisterRsp, WHvX64RegisterRbp, WHvX64RegisterRsi, WHvX64RegisterRdi = 0x04, 0x05, 0x06, 0x07
WHvX64RegisterRip = 0x10
WHvX64RegisterRflags = 0x11
WHvX64RegisterEs, WHvX64RegisterCs, WHvX64RegisterSs, WHvX64RegisterDs = 0x12, 0x13, 0x14, 0x15
WHvX64RegisterFs, WHvX64RegisterGs, WHvX64RegisterLdtr, WHvX64RegisterTr = 0x16, 0x17, 0x18, 0x19
WHvX64RegisterIdtr, WHvX64RegisterGdtr = 0x1A, 0x1B
WHvX64RegisterCr0, WHvX64RegisterCr2, WHvX64RegisterCr3, WHvX64RegisterCr4, WHvX64RegisterCr8 = 0x1C, 0x1D, 0x1E, 0x1F, 0x20
WHvX64RegisterDr0, WHvX64RegisterDr6, WHvX64RegisterDr7 = 0x21, 0x25, 0x26
WHvX64RegisterXCr0 = 0x27
WHvX64RegisterXmm0 = 0x1000
WHvX64RegisterFpMmx0 = 0x1010
WHvX64RegisterFpControlStatus = 0x1018
WHvX64RegisterXmmControlStatus = 0x1019
WHvX64RegisterTsc = 0x2000
WHvX64RegisterEfer = 0x2001
WHvX64RegisterKernelGsBase = 0x2002
WHvX64RegisterApicBase = 0x2003
WHvX64RegisterPat = 0x2004
WHvX64RegisterSysenterCs, WHvX64RegisterSysenterEip, WHvX64RegisterSysenterEsp = 0x2005, 0x2006, 0x2007
WHvX64RegisterStar, WHvX64RegisterLstar, WHvX64RegisterCstar, WHvX64RegisterSfmask = 0x2008, 0x2009, 0x200A, 0x200B
WHvX64RegisterMsrMtrrDefType = 0x200E
WHvX64RegisterTscAux = 0x207B
WHvRegisterPendingInterruption = 0x80000000
WHvRegisterInterruptState = 0x80000001
WHvRegisterPendingEvent = 0x80000002
WHvX64RegisterDeliverabilityNotifications = 0x80000004
WHvRegisterInternalActivityState = 0x80000005

# --- bits of the integer-declared bitfield registers -------------------------------
#: WHV_X64_PENDING_INTERRUPTION_REGISTER
PENDING_INTERRUPTION_PENDING = 1 << 0
PENDING_INTERRUPTION_TYPE_SHIFT = 1  # 3 bits: WHvX64PendingInterrupt 0, WHvX64PendingNmi 2, WHvX64PendingException 3
PENDING_INTERRUPTION_DELIVER_ERROR_CODE = 1 << 4
PENDING_INTERRUPTION_LENGTH_SHIFT = 5  # 4 bits
PENDING_INTERRUPTION_VECTOR_SHIFT = 16  # 16 bits
PENDING_INTERRUPTION_ERROR_CODE_SHIFT = 32
WHvX64PendingInterrupt, WHvX64PendingNmi, WHvX64PendingException = 0, 2, 3
#: WHV_X64_INTERRUPT_STATE_REGISTER
INTERRUPT_STATE_SHADOW = 1 << 0
INTERRUPT_STATE_NMI_MASKED = 1 << 1
#: WHV_X64_DELIVERABILITY_NOTIFICATIONS_REGISTER
DELIVERABILITY_NMI = 1 << 0
DELIVERABILITY_INTERRUPT = 1 << 1
#: WHV_X64_VP_EXECUTION_STATE (VpContext.ExecutionState)
EXECUTION_STATE_CPL_MASK = 0x3
EXECUTION_STATE_INTERRUPTION_PENDING = 1 << 6
EXECUTION_STATE_INTERRUPT_SHADOW = 1 << 12
#: WHV_MEMORY_ACCESS_INFO (AccessType: read 0, write 1, execute 2)
MEMORY_ACCESS_TYPE_MASK = 0x3
MEMORY_ACCESS_GPA_UNMAPPED = 1 << 2
MEMORY_ACCESS_GVA_VALID = 1 << 3
#: WHV_X64_IO_PORT_ACCESS_INFO
IO_ACCESS_IS_WRITE = 1 << 0
IO_ACCESS_SIZE_SHIFT = 1  # 3 bits: 1, 2 or 4
IO_ACCESS_STRING_OP = 1 << 4
IO_ACCESS_REP_PREFIX = 1 << 5
#: WHV_EMULATOR_STATUS
EMULATOR_STATUS_SUCCESSFUL = 1 << 0
#: WHV_X64_SEGMENT_REGISTER.Attributes
SEGMENT_TYPE_MASK = 0xF
SEGMENT_NON_SYSTEM = 1 << 4
SEGMENT_DPL_SHIFT = 5
SEGMENT_PRESENT = 1 << 7
SEGMENT_AVAILABLE = 1 << 12
SEGMENT_LONG = 1 << 13
SEGMENT_DEFAULT = 1 << 14
SEGMENT_GRANULARITY = 1 << 15

# --- WHV_INTERRUPT_CONTROL --------------------------------------------------------
WHvX64InterruptTypeFixed, WHvX64InterruptTypeLowestPriority, WHvX64InterruptTypeNmi = 0, 1, 4
WHvX64InterruptTypeInit, WHvX64InterruptTypeSipi = 5, 6
INTERRUPT_CONTROL_DESTINATION_MODE_SHIFT = 8
INTERRUPT_CONTROL_TRIGGER_MODE_SHIFT = 12

# --- HRESULTs ------------------------------------------------------------------------
S_OK = 0
WHV_E_UNKNOWN_CAPABILITY = 0x80370300
WHV_E_INSUFFICIENT_BUFFER = 0x80370301
WHV_E_UNKNOWN_PROPERTY = 0x80370302
WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG = 0x80370303
WHV_E_INVALID_PARTITION_CONFIG = 0x80370304
WHV_E_GPA_RANGE_NOT_FOUND = 0x80370305
WHV_E_VP_ALREADY_EXISTS = 0x80370306
WHV_E_VP_DOES_NOT_EXIST = 0x80370307
WHV_E_INVALID_VP_STATE = 0x80370308
WHV_E_INVALID_VP_REGISTER_NAME = 0x80370309
E_NOTIMPL = 0x80004001
E_FAIL = 0x80004005
E_ACCESSDENIED = 0x80070005
E_INVALIDARG = 0x80070057
E_UNEXPECTED = 0x8000FFFF

HRESULT_NAMES = {value: name for name, value in globals().items()
                 if name.startswith(("WHV_E_", "E_")) and isinstance(value, int)}  # fmt: skip


def failed(hr: int) -> bool:
    """An HRESULT reports failure when negative as an int32 (its top bit)."""
    return (hr & 0xFFFFFFFF) >= 0x80000000


def hresult_text(hr: int) -> str:
    hr &= 0xFFFFFFFF
    name = HRESULT_NAMES.get(hr)
    return f"{name} ({hr:#010x})" if name else f"HRESULT {hr:#010x}"


def new_register_values(count: int):
    """A 16-byte aligned WHV_REGISTER_VALUE[count] (the header's DECLSPEC_ALIGN(16)); (array, keep-alive)."""
    raw = ffi.new("char[]", 16 * count + 16)
    address = int(ffi.cast("uintptr_t", raw))
    aligned = ffi.cast("WHV_REGISTER_VALUE *", address + (-address % 16))
    return aligned, raw


def load():
    """(platform, emulation) libraries: WinHvPlatform.dll and WinHvEmulation.dll (Windows 10 1803+)."""
    return ffi.dlopen(PLATFORM_DLL), ffi.dlopen(EMULATION_DLL)
