"""ffi/whpx.py reproduces the sizes and offsets of Microsoft's WHPX headers (x64).

The values are the headers' own: C_ASSERTs in WinHvPlatformDefs.h (MicrosoftDocs/
Virtualization-Documentation, 2025) and crosvm's bindgen layout tests of its vendored copy
(hypervisor/src/whpx/whpx_sys), collected in shared/notes/hvf-whpx-headers.md sections 3.2-3.9.
"""

import pytest

from pyvmm.ffi import whpx
from pyvmm.ffi.whpx import ffi

LAYOUTS = {
    # struct: (size, {field: offset})
    "WHV_RUN_VP_EXIT_CONTEXT": (224, {"ExitReason": 0, "Reserved": 4, "VpContext": 8, "MemoryAccess": 48,
                                      "IoPortAccess": 48, "CancelReason": 48, "Hypercall": 48}),
    "WHV_VP_EXIT_CONTEXT": (40, {"ExecutionState": 0, "InstructionLengthCr8": 2, "Reserved2": 4, "Cs": 8, "Rip": 24,
                                 "Rflags": 32}),
    "WHV_X64_SEGMENT_REGISTER": (16, {"Base": 0, "Limit": 8, "Selector": 12, "Attributes": 14}),
    "WHV_X64_TABLE_REGISTER": (16, {"Pad": 0, "Limit": 6, "Base": 8}),
    "WHV_REGISTER_VALUE": (16, {"Reg64": 0, "Segment": 0, "Table": 0}),
    "WHV_MEMORY_ACCESS_CONTEXT": (40, {"InstructionByteCount": 0, "InstructionBytes": 4, "AccessInfo": 20, "Gpa": 24,
                                       "Gva": 32}),
    "WHV_X64_IO_PORT_ACCESS_CONTEXT": (96, {"InstructionByteCount": 0, "InstructionBytes": 4, "AccessInfo": 20,
                                            "PortNumber": 24, "Rax": 32, "Rcx": 40, "Rsi": 48, "Rdi": 56, "Ds": 64,
                                            "Es": 80}),
    "WHV_X64_MSR_ACCESS_CONTEXT": (24, {"AccessInfo": 0, "MsrNumber": 4, "Rax": 8, "Rdx": 16}),
    "WHV_X64_CPUID_ACCESS_CONTEXT": (64, {"Rax": 0, "Rcx": 8, "Rdx": 16, "Rbx": 24, "DefaultResultRax": 32,
                                          "DefaultResultRbx": 56}),
    "WHV_VP_EXCEPTION_CONTEXT": (40, {"InstructionBytes": 4, "ExceptionInfo": 20, "ExceptionType": 24, "ErrorCode": 28,
                                      "ExceptionParameter": 32}),
    "WHV_X64_UNSUPPORTED_FEATURE_CONTEXT": (16, {"FeatureCode": 0, "FeatureParameter": 8}),
    "WHV_HYPERCALL_CONTEXT": (176, {"Rax": 0, "Rdi": 48, "XmmRegisters": 64, "Reserved1": 160}),
    "WHV_INTERRUPT_CONTROL": (16, {"Destination": 8, "Vector": 12}),
    "WHV_EMULATOR_CALLBACKS": (48, {"Size": 0, "Reserved": 4, "WHvEmulatorIoPortCallback": 8,
                                    "WHvEmulatorMemoryCallback": 16, "WHvEmulatorGetVirtualProcessorRegisters": 24,
                                    "WHvEmulatorSetVirtualProcessorRegisters": 32, "WHvEmulatorTranslateGvaPage": 40}),
    "WHV_EMULATOR_IO_ACCESS_INFO": (12, {"Direction": 0, "Port": 2, "AccessSize": 4, "Data": 8}),
    "WHV_EMULATOR_MEMORY_ACCESS_INFO": (24, {"GpaAddress": 0, "Direction": 8, "AccessSize": 9, "Data": 10}),
    "WHV_TRANSLATE_GVA_RESULT": (8, {"ResultCode": 0, "Reserved": 4}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_struct_layout_matches_the_header(name):
    size, offsets = LAYOUTS[name]
    assert ffi.sizeof(name) == size
    for field, offset in offsets.items():
        assert ffi.offsetof(name, field) == offset, f"{name}.{field}"


def test_union_members_of_the_exit_context_sit_at_48():
    # absolute offsets a fake writes most (notes 3.8): IoPortAccess.PortNumber 72, MemoryAccess.Gpa 72, VpContext.Rip 32
    assert ffi.offsetof("WHV_RUN_VP_EXIT_CONTEXT", "IoPortAccess") + ffi.offsetof(
        "WHV_X64_IO_PORT_ACCESS_CONTEXT", "PortNumber") == 72
    assert ffi.offsetof("WHV_RUN_VP_EXIT_CONTEXT", "VpContext") + ffi.offsetof("WHV_VP_EXIT_CONTEXT", "Rip") == 32


def test_values_of_the_header_enums():
    assert (whpx.WHvRunVpExitReasonX64IoPortAccess, whpx.WHvRunVpExitReasonX64Halt,
            whpx.WHvRunVpExitReasonX64InterruptWindow, whpx.WHvRunVpExitReasonCanceled) == (2, 8, 7, 0x2001)  # fmt: skip
    assert (whpx.WHvX64RegisterRip, whpx.WHvX64RegisterCr8, whpx.WHvX64RegisterXCr0, whpx.WHvX64RegisterEfer) == (
        0x10, 0x20, 0x27, 0x2001)
    assert whpx.WHvX64RegisterDeliverabilityNotifications == 0x80000004
    assert (whpx.WHvX64RegisterRcx, whpx.WHvX64RegisterRbx, whpx.WHvX64RegisterRsp, whpx.WHvX64RegisterRdi) == (1, 3, 4, 7)
    assert whpx.WHV_GPR_NAMES[whpx.WHvX64RegisterRbx] == "Rbx"
    assert whpx.WHvPartitionPropertyCodeProcessorCount == 0x1FFF
    # the pending-interruption encoding the notes checked with gcc: 0xdeadbeef123401f7
    value = (whpx.PENDING_INTERRUPTION_PENDING | whpx.WHvX64PendingException << whpx.PENDING_INTERRUPTION_TYPE_SHIFT
             | whpx.PENDING_INTERRUPTION_DELIVER_ERROR_CODE | 0xF << whpx.PENDING_INTERRUPTION_LENGTH_SHIFT
             | 0x1234 << whpx.PENDING_INTERRUPTION_VECTOR_SHIFT | 0xDEADBEEF << whpx.PENDING_INTERRUPTION_ERROR_CODE_SHIFT)
    assert value == 0xDEADBEEF123401F7


def test_hresults_and_register_arrays():
    assert whpx.failed(0x80370300) and whpx.failed(-1) and not whpx.failed(0)
    assert whpx.hresult_text(0x80070057) == "E_INVALIDARG (0x80070057)"
    values, keep = whpx.new_register_values(5)
    assert int(ffi.cast("uintptr_t", values)) % 16 == 0 and keep is not None


def test_importing_loads_no_library():
    """The declarations parse on every OS; only load() needs Windows."""
    assert whpx.PLATFORM_DLL == "WinHvPlatform.dll" and callable(whpx.load)
