"""The Windows Hypervisor Platform backend: x86_64 guests through WinHvPlatform and WinHvEmulation.

As QEMU's whpx accelerator does without the in-hypervisor APIC, the VMM owns the
interrupt controllers (the userspace irqchip, ``hvcore.py``): interrupts and NMIs
go in through ``WHvRegisterPendingInterruption``, and an interrupt window is
requested through ``WHvX64RegisterDeliverabilityNotifications``. The partition is
set up with CPUID exits for every leaf of the VM's table and MSR exits for the
MSRs the hypervisor does not keep itself, so CPUID answers come from the same
table as on KVM.

Exits: simple port I/O is decoded from the exit context and completed here (an IN
may go to the VMM as an exit); string I/O and MMIO go to WinHvEmulation, whose
callbacks reach the irqchip and the VMM's I/O handler on the vCPU's thread;
CPUID, MSR, HLT (the hypervisor has completed it), interrupt window, cancellation
(``WHvCancelRunVirtualProcessor`` from any thread) and unrecoverable exceptions
(a triple fault).

Guest debugging (``set_guest_debug``, hvcore.py): the partition is set up with
ExtendedVmExits.ExceptionExit and an ExceptionExitBitmap of #DB (DebugTrapOrFault,
1) and #BP (BreakpointTrap, 3), as Hyperlight's and VirtualBox's WHPX backends do,
so both always exit as WHvRunVpExitReasonException (WHV_VP_EXCEPTION_CONTEXT:
ExceptionType, the VpContext's InstructionLength); after a #DB the hit bits are read
from WHvX64RegisterDr6 (as Hyperlight's debugger reads them). Single steps set
RFLAGS.TF; DR0-DR3/DR7 are WHvX64RegisterDr0-Dr3/Dr7. An exception that is the
guest's own goes back in through WHvRegisterPendingInterruption as an exception
(an INT3's return RIP moved past it first: QEMU notes that WHPX's software-exception
injection was unreliable, so a hardware exception at the next instruction stands in
for it; it skips the IDT gate's DPL check that INT3 from user mode would make).

Never run on Windows here: contract-tested against tests/fakes/whpx.py, which
follows Microsoft's headers and documentation (README, "Where it ran").
"""

from __future__ import annotations

import struct

from pyvmm.accel import whv
from pyvmm.accel.core import Capability, InternalError, Shutdown, VcpuState
from pyvmm.accel.core import IoIn, IoOut, MmioRead, MmioWrite
from pyvmm.accel.hvcore import BP, DB, HypervisorVcpu, HypervisorVm, page_aligned
from pyvmm.accel.x86 import (
    ARCH,
    SHADOW_STI,
    DescriptorTable,
    FpuState,
    PendingEvents,
    Regs,
    SpecialRegs,
    fpu_from_fxsave,
)
from pyvmm.arch.x86 import msrs as m
from pyvmm.arch.x86.registers import RFLAGS_IF
from pyvmm.errors import AccelError, PyvmmError
from pyvmm.ffi import whpx as w

TITLE = "WHPX"
ffi = w.ffi

_ENABLE_HELP = ("enable the Windows Hypervisor Platform feature (as administrator: "
                "DISM /Online /Enable-Feature /FeatureName:HypervisorPlatform /All, then reboot); inside a VM "
                "the host must also expose nested virtualization (Hyper-V: Set-VMProcessor -ExposeVirtualizationExtensions $true)")  # fmt: skip

_GPRS = tuple(w.WHvX64RegisterRax + i for i in range(16))
_REGS_NAMES = _GPRS + (w.WHvX64RegisterRip, w.WHvX64RegisterRflags)
#: Regs fields in WHV register order (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15, RIP, RFLAGS)
_REGS_FIELDS = tuple(name.lower() for name in w.WHV_GPR_NAMES) + ("rip", "rflags")
_SEGMENTS = (("es", w.WHvX64RegisterEs), ("cs", w.WHvX64RegisterCs), ("ss", w.WHvX64RegisterSs),
             ("ds", w.WHvX64RegisterDs), ("fs", w.WHvX64RegisterFs), ("gs", w.WHvX64RegisterGs),
             ("ldt", w.WHvX64RegisterLdtr), ("tr", w.WHvX64RegisterTr))  # fmt: skip
_CRS = (("cr0", w.WHvX64RegisterCr0), ("cr2", w.WHvX64RegisterCr2), ("cr3", w.WHvX64RegisterCr3),
        ("cr4", w.WHvX64RegisterCr4), ("cr8", w.WHvX64RegisterCr8), ("efer", w.WHvX64RegisterEfer))  # fmt: skip
_SREGS_NAMES = (tuple(reg for _, reg in _SEGMENTS) + (w.WHvX64RegisterIdtr, w.WHvX64RegisterGdtr)
                + tuple(reg for _, reg in _CRS))  # fmt: skip
_FPU_NAMES = ((w.WHvX64RegisterFpControlStatus, w.WHvX64RegisterXmmControlStatus)
              + tuple(w.WHvX64RegisterFpMmx0 + i for i in range(8)) + tuple(w.WHvX64RegisterXmm0 + i for i in range(16)))  # fmt: skip
_EVENT_NAMES = (w.WHvRegisterPendingInterruption, w.WHvRegisterInterruptState)
_WINDOW_NAMES = (w.WHvX64RegisterRflags, w.WHvRegisterInterruptState, w.WHvRegisterPendingInterruption)
_DR_NAMES = (w.WHvX64RegisterDr0, w.WHvX64RegisterDr0 + 1, w.WHvX64RegisterDr0 + 2, w.WHvX64RegisterDr0 + 3)
_COMPLETED_BY_VMM = frozenset({w.WHvRunVpExitReasonX64IoPortAccess, w.WHvRunVpExitReasonMemoryAccess,
                               w.WHvRunVpExitReasonX64Halt, w.WHvRunVpExitReasonX64Cpuid,
                               w.WHvRunVpExitReasonX64MsrAccess})  # fmt: skip

#: MSRs the hypervisor keeps as named registers; the others exit and are answered from a shadow
MSR_REGISTERS = {
    m.MSR_IA32_TSC: w.WHvX64RegisterTsc, m.MSR_EFER: w.WHvX64RegisterEfer,
    m.MSR_KERNEL_GS_BASE: w.WHvX64RegisterKernelGsBase, m.MSR_IA32_CR_PAT: w.WHvX64RegisterPat,
    m.MSR_IA32_SYSENTER_CS: w.WHvX64RegisterSysenterCs, m.MSR_IA32_SYSENTER_EIP: w.WHvX64RegisterSysenterEip,
    m.MSR_IA32_SYSENTER_ESP: w.WHvX64RegisterSysenterEsp, m.MSR_STAR: w.WHvX64RegisterStar,
    m.MSR_LSTAR: w.WHvX64RegisterLstar, m.MSR_CSTAR: w.WHvX64RegisterCstar,
    m.MSR_SYSCALL_MASK: w.WHvX64RegisterSfmask, m.MSR_TSC_AUX: w.WHvX64RegisterTscAux,
    0x2FF: w.WHvX64RegisterMsrMtrrDefType,
}  # fmt: skip
_SEGMENT_BASE_MSRS = {m.MSR_FS_BASE: w.WHvX64RegisterFs, m.MSR_GS_BASE: w.WHvX64RegisterGs}

_library = None


def _load():
    global _library
    if _library is None:
        _library = w.load()
    return _library


def _check(hr: int, what: str) -> None:
    if w.failed(hr):
        raise AccelError("whpx", f"{what} failed: {w.hresult_text(hr)}")


def _hresult(value: int) -> int:
    """An HRESULT as the int32 a callback returns."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _hypervisor_present(lib) -> bool:
    present = ffi.new("uint64_t *")
    written = ffi.new("uint32_t *")
    hr = lib.WHvGetCapability(w.WHvCapabilityCodeHypervisorPresent, present, 8, written)
    return not w.failed(hr) and bool(present[0] & 0xFFFFFFFF)


def probe() -> tuple[bool, str, list[str]]:
    """For ``pyvmm check``: can a partition be set up here, and exactly why not."""
    notes = ["CPUID: the interpreter's baseline x86-64 model (no AVX), not yet the host's full feature set",
             "never run on Windows by the project: contract-tested against a fake of the documented API"]
    try:
        lib, _ = _load()
    except OSError as err:
        return False, (f"cannot load {w.PLATFORM_DLL}/{w.EMULATION_DLL} (Windows 10 1803 or later): {err}; "
                       f"{_ENABLE_HELP}"), notes  # fmt: skip
    if not _hypervisor_present(lib):
        return False, f"WHvGetCapability: no hypervisor present; {_ENABLE_HELP}", notes
    handle = ffi.new("WHV_PARTITION_HANDLE *")
    hr = lib.WHvCreatePartition(handle)
    if w.failed(hr):
        return False, f"WHvCreatePartition failed: {w.hresult_text(hr)}", notes
    try:
        count = ffi.new("char[]", WhpxVm._scalar("<I", 1))
        hr = lib.WHvSetPartitionProperty(handle[0], w.WHvPartitionPropertyCodeProcessorCount, count, 32)
        if not w.failed(hr):
            hr = lib.WHvSetupPartition(handle[0])
    finally:
        lib.WHvDeletePartition(handle[0])
    if (hr & 0xFFFFFFFF) == w.WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG:
        return False, ("WHvSetupPartition: WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG, the hypervisor cannot run "
                       "partitions here (a VM without nested virtualization?)"), notes  # fmt: skip
    if w.failed(hr):
        return False, f"setting up a partition failed: {w.hresult_text(hr)}", notes
    return True, "a partition was set up (WinHvPlatform)", notes


def create_vm(vcpu_count: int = 1, *, irqchip=None, **options) -> WhpxVm:
    return WhpxVm(vcpu_count, irqchip=irqchip)


class WhpxVm(HypervisorVm):
    name = "whpx"
    title = TITLE
    arch = ARCH
    capabilities = frozenset({Capability.USERSPACE_IRQCHIP, Capability.SERVE_IO_DIRECTLY, Capability.READONLY_MEMORY,
                              Capability.GUEST_DEBUG, Capability.INSTRUCTION_BREAKPOINTS})  # fmt: skip
    max_vcpus = 254

    def __init__(self, vcpu_count: int = 1, *, irqchip=None):
        if not 1 <= vcpu_count <= self.max_vcpus:
            raise AccelError("whpx", f"vcpu_count {vcpu_count} is outside 1..{self.max_vcpus}")
        self.lib, self.emulation = _load()
        if not _hypervisor_present(self.lib):
            raise AccelError("whpx", f"no hypervisor present; {_ENABLE_HELP}")
        self._init_platform(vcpu_count, irqchip)
        self._exports: dict[int, tuple[object, int, int]] = {}
        handle = ffi.new("WHV_PARTITION_HANDLE *")
        _check(self.lib.WHvCreatePartition(handle), "WHvCreatePartition")
        self.partition = handle[0]
        try:
            self._setup()
        except AccelError:
            self.lib.WHvDeletePartition(self.partition)
            self.partition = None
            raise
        self.irqchip.on_wake(self._wake)

    def _set_property(self, code: int, value: bytes, what: str) -> None:
        buffer = ffi.new("char[]", value)
        _check(self.lib.WHvSetPartitionProperty(self.partition, code, buffer, len(value)), f"WHvSetPartitionProperty({what})")

    @staticmethod
    def _scalar(fmt: str, value: int) -> bytes:
        """A one-field WHV_PARTITION_PROPERTY (32 bytes, as QEMU passes it)."""
        return struct.pack(fmt, value).ljust(32, b"\0")

    def _setup(self) -> None:
        """Partition properties, then WHvSetupPartition (properties must come first)."""
        self._set_property(w.WHvPartitionPropertyCodeProcessorCount, self._scalar("<I", self.vcpu_count), "ProcessorCount")
        exits = w.WHV_EXTENDED_VM_EXIT_X64_CPUID | w.WHV_EXTENDED_VM_EXIT_X64_MSR | w.WHV_EXTENDED_VM_EXIT_EXCEPTION
        self._set_property(w.WHvPartitionPropertyCodeExtendedVmExits, self._scalar("<Q", exits), "ExtendedVmExits")
        # #DB and #BP exit (the debugger's steps and breakpoints; the guest's own are handed back)
        self._set_property(w.WHvPartitionPropertyCodeExceptionExitBitmap, self._scalar("<Q", 1 << DB | 1 << BP),
                           "ExceptionExitBitmap")  # fmt: skip
        # every leaf of the VM's table exits, so the guest sees the same CPUID as on KVM
        leaves = sorted({entry.function for entry in self.supported_cpuid()})
        self._set_property(w.WHvPartitionPropertyCodeCpuidExitList, struct.pack(f"<{len(leaves)}I", *leaves), "CpuidExitList")
        self._set_property(w.WHvPartitionPropertyCodeLocalApicEmulationMode,
                           self._scalar("<I", w.WHvX64LocalApicEmulationModeNone), "LocalApicEmulationMode")
        hr = self.lib.WHvSetupPartition(self.partition)
        if (hr & 0xFFFFFFFF) == w.WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG:
            raise AccelError("whpx", "WHvSetupPartition: WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG (a VM without nested "
                                     f"virtualization?); {_ENABLE_HELP}")  # fmt: skip
        _check(hr, "WHvSetupPartition")

    def map_memory(self, slot: int, guest_addr: int, host_buffer, *, readonly: bool = False) -> None:
        size = len(host_buffer)
        if not page_aligned(guest_addr, size):
            raise AccelError("whpx", f"memory slot {slot}: {guest_addr:#x}+{size:#x} is not page-aligned")
        if slot in self.slots:
            raise AccelError("whpx", f"memory slot {slot} is already mapped")
        try:
            export = ffi.from_buffer(host_buffer, require_writable=True)
        except TypeError as err:
            raise AccelError("whpx", f"memory slot {slot}: host buffer must be a writable mmap ({err})") from err
        flags = w.WHvMapGpaRangeFlagRead | w.WHvMapGpaRangeFlagExecute | (0 if readonly else w.WHvMapGpaRangeFlagWrite)
        _check(self.lib.WHvMapGpaRange(self.partition, export, guest_addr, size, flags),
               f"WHvMapGpaRange(slot {slot}, {guest_addr:#x}+{size:#x})")  # fmt: skip
        self.slots[slot] = (guest_addr, host_buffer)
        self._exports[slot] = (export, guest_addr, size)

    def unmap_memory(self, slot: int) -> None:
        export, guest_addr, size = self._exports.pop(slot)
        self.slots.pop(slot)
        _check(self.lib.WHvUnmapGpaRange(self.partition, guest_addr, size), f"WHvUnmapGpaRange(slot {slot})")
        ffi.release(export)

    def close(self) -> None:
        self._close_vcpus()
        if getattr(self, "partition", None) is None:
            return
        for slot in list(self._exports):
            self.unmap_memory(slot)
        self.lib.WHvDeletePartition(self.partition)
        self.partition = None


# --- WinHvEmulation callbacks (Context is a handle of the WhpxVcpu) ---------------------------------
def _callback(kind: str):
    """A C callback calling ``WhpxVcpu._on_<kind>``; an exception is kept for the vCPU to raise."""

    def decorate(fn):
        def body(context, *args):
            vcpu = ffi.from_handle(context)
            try:
                return fn(vcpu, *args)
            except BaseException as err:  # raised again on the vCPU's thread once the emulator returns
                if vcpu._callback_error is None:
                    vcpu._callback_error = err
                return _hresult(w.E_FAIL)

        return ffi.callback(kind, body)

    return decorate


@_callback("WHV_EMULATOR_IO_PORT_CALLBACK")
def _io_port_callback(vcpu, info):
    size = info.AccessSize
    if info.Direction == 0:
        data = bytearray(size)
        vcpu._access(IoIn(info.Port, memoryview(data)))
        info.Data = int.from_bytes(data, "little")
    else:
        vcpu._access(IoOut(info.Port, (info.Data & ((1 << (8 * size)) - 1)).to_bytes(size, "little")))
    return w.S_OK


@_callback("WHV_EMULATOR_MEMORY_CALLBACK")
def _memory_callback(vcpu, info):
    gpa, size = info.GpaAddress, info.AccessSize
    if not 1 <= size <= 8:
        return _hresult(w.E_INVALIDARG)
    ram = vcpu._vm.ram_at(gpa, size)
    if info.Direction == 0:
        if ram is not None:
            buf, offset = ram
            ffi.memmove(info.Data, bytes(buf[offset : offset + size]), size)
        else:
            data = bytearray(size)
            vcpu._access(MmioRead(gpa, memoryview(data)))
            ffi.memmove(info.Data, bytes(data), size)
    else:
        data = bytes(ffi.buffer(info.Data, size))
        if ram is not None:
            buf, offset = ram
            buf[offset : offset + size] = data
        else:
            vcpu._access(MmioWrite(gpa, data))
    return w.S_OK


@_callback("WHV_EMULATOR_GET_VIRTUAL_PROCESSOR_REGISTERS_CALLBACK")
def _get_registers_callback(vcpu, names, count, values):
    return vcpu.lib.WHvGetVirtualProcessorRegisters(vcpu._vm.partition, vcpu.index, names, count, values)


@_callback("WHV_EMULATOR_SET_VIRTUAL_PROCESSOR_REGISTERS_CALLBACK")
def _set_registers_callback(vcpu, names, count, values):
    return vcpu.lib.WHvSetVirtualProcessorRegisters(vcpu._vm.partition, vcpu.index, names, count, values)


@_callback("WHV_EMULATOR_TRANSLATE_GVA_PAGE_CALLBACK")
def _translate_callback(vcpu, gva, flags, result_code, gpa):
    result = ffi.new("WHV_TRANSLATE_GVA_RESULT *")
    hr = vcpu.lib.WHvTranslateGva(vcpu._vm.partition, vcpu.index, gva, flags, result, gpa)
    if not w.failed(hr):
        result_code[0] = result.ResultCode
    return hr


_CALLBACKS = ffi.new("WHV_EMULATOR_CALLBACKS *", {
    "Size": ffi.sizeof("WHV_EMULATOR_CALLBACKS"), "WHvEmulatorIoPortCallback": _io_port_callback,
    "WHvEmulatorMemoryCallback": _memory_callback, "WHvEmulatorGetVirtualProcessorRegisters": _get_registers_callback,
    "WHvEmulatorSetVirtualProcessorRegisters": _set_registers_callback,
    "WHvEmulatorTranslateGvaPage": _translate_callback,
})  # fmt: skip


class WhpxVcpu(HypervisorVcpu):
    backend = "whpx"

    def __init__(self, vm: WhpxVm, index: int):
        super().__init__(vm, index)
        self.lib, self._emulation = vm.lib, vm.emulation
        self._partition = vm.partition
        self._exit = ffi.new("WHV_RUN_VP_EXIT_CONTEXT *")
        self._exit_size = ffi.sizeof("WHV_RUN_VP_EXIT_CONTEXT")
        self._pending_in = None  # (data, size, rax at the exit, next rip) of an IN returned to the VMM
        self._window_requested = False
        self._callback_error: BaseException | None = None
        self._names: dict[tuple[int, ...], object] = {}
        _check(self.lib.WHvCreateVirtualProcessor(self._partition, index, 0), f"WHvCreateVirtualProcessor({index})")
        self._handle = ffi.new_handle(self)
        emulator = ffi.new("WHV_EMULATOR_HANDLE *")
        hr = self._emulation.WHvEmulatorCreateEmulator(_CALLBACKS, emulator)
        if w.failed(hr):
            self.lib.WHvDeleteVirtualProcessor(self._partition, index)
            _check(hr, "WHvEmulatorCreateEmulator")
        self._hv_emulator = emulator[0]

    # ------------------------------------------------------------------ registers
    def _name_array(self, names: tuple[int, ...]):
        array = self._names.get(names)
        if array is None:
            array = self._names[names] = ffi.new("WHV_REGISTER_NAME[]", names)
        return array

    def _get(self, names: tuple[int, ...]):
        values, keep = w.new_register_values(len(names))
        _check(self.lib.WHvGetVirtualProcessorRegisters(self._partition, self.index, self._name_array(names),
                                                        len(names), values), f"WHvGetVirtualProcessorRegisters({names[0]:#x}..)")  # fmt: skip
        return values, keep

    def _set(self, names: tuple[int, ...], fill) -> None:
        """Write registers ``names``; ``fill(values)`` fills the WHV_REGISTER_VALUE array."""
        values, keep = w.new_register_values(len(names))
        fill(values)
        _check(self.lib.WHvSetVirtualProcessorRegisters(self._partition, self.index, self._name_array(names),
                                                        len(names), values), f"WHvSetVirtualProcessorRegisters({names[0]:#x}..)")  # fmt: skip

    def _get64(self, *names: int) -> list[int]:
        values, _ = self._get(names)
        return [int(values[i].Reg64) for i in range(len(names))]

    def _set64(self, pairs: dict[int, int]) -> None:
        names = tuple(pairs)

        def fill(values):
            for i, name in enumerate(names):
                values[i].Reg64 = pairs[name] & 0xFFFFFFFFFFFFFFFF

        self._set(names, fill)

    def get_regs(self) -> Regs:
        regs = Regs(**dict(zip(_REGS_FIELDS, self._get64(*_REGS_NAMES))))
        regs.rflags = self._guest_rflags(regs.rflags)
        return regs

    def set_regs(self, regs: Regs) -> None:
        values = {name: getattr(regs, field) for name, field in zip(_REGS_NAMES, _REGS_FIELDS)}
        values[w.WHvX64RegisterRflags] = self._hardware_rflags(regs.rflags)
        self._set64(values)

    # ------------------------------------------------------------------ guest debugging (hvcore's hooks)
    def _read_rflags(self) -> int:
        return self._get64(w.WHvX64RegisterRflags)[0]

    def _write_rflags(self, value: int) -> None:
        self._set64({w.WHvX64RegisterRflags: value})

    def _read_rip(self) -> int:
        return self._get64(w.WHvX64RegisterRip)[0]

    def _cs_base(self) -> int:
        values, _ = self._get((w.WHvX64RegisterCs,))
        return int(values[0].Segment.Base)

    def _read_drs(self) -> tuple[tuple[int, int, int, int], int]:
        *addresses, dr7 = self._get64(*_DR_NAMES, w.WHvX64RegisterDr7)
        return tuple(addresses), dr7

    def _write_drs(self, addresses, dr7: int) -> None:
        self._set64({**dict(zip(_DR_NAMES, addresses)), w.WHvX64RegisterDr7: dr7})

    def _reinject(self, vector: int, length: int, dr6: int) -> None:
        """The guest's own #BP/#DB through WHvRegisterPendingInterruption (DR6 already holds #DB's bits)."""
        if vector == BP:  # the exit is at the INT3; its handler returns past it
            self._set64({w.WHvX64RegisterRip: self._read_rip() + length})
        self._set64({w.WHvRegisterPendingInterruption: whv.pending_interruption(vector, w.WHvX64PendingException)})

    def get_sregs(self) -> SpecialRegs:
        values, _ = self._get(_SREGS_NAMES)
        out = {}
        for i, (field, _) in enumerate(_SEGMENTS):
            s = values[i].Segment
            out[field] = whv.whv_to_segment(s.Base, s.Limit, s.Selector, s.Attributes)
        idt, gdt = values[len(_SEGMENTS)].Table, values[len(_SEGMENTS) + 1].Table
        out["idt"], out["gdt"] = DescriptorTable(idt.Base, idt.Limit), DescriptorTable(gdt.Base, gdt.Limit)
        for i, (field, _) in enumerate(_CRS, start=len(_SEGMENTS) + 2):
            out[field] = int(values[i].Reg64)
        return SpecialRegs(**out, apic_base=self._chip.get_apic_base(self.index))

    def set_sregs(self, sregs: SpecialRegs) -> None:
        def fill(values):
            for i, (field, _) in enumerate(_SEGMENTS):
                s = values[i].Segment
                s.Base, s.Limit, s.Selector, s.Attributes = whv.segment_to_whv(getattr(sregs, field))
            for i, table in ((len(_SEGMENTS), sregs.idt), (len(_SEGMENTS) + 1, sregs.gdt)):
                values[i].Table.Base, values[i].Table.Limit = table.base, table.limit
            for i, (field, _) in enumerate(_CRS, start=len(_SEGMENTS) + 2):
                values[i].Reg64 = getattr(sregs, field) & 0xFFFFFFFFFFFFFFFF

        self._set(_SREGS_NAMES, fill)
        if sregs.apic_base and sregs.apic_base != self._chip.get_apic_base(self.index):
            self._chip.set_apic_base(self.index, sregs.apic_base)

    def get_fpu(self) -> FpuState:
        """FpControlStatus and XmmControlStatus are the first 32 bytes of an FXSAVE image (WinHvPlatformDefs.h)."""
        values, _ = self._get(_FPU_NAMES)
        raw = [bytes(ffi.buffer(ffi.addressof(values[i]), 16)) for i in range(len(_FPU_NAMES))]
        area = raw[0] + raw[1] + b"".join(raw[2:10]) + b"".join(raw[10:26])
        return fpu_from_fxsave(area.ljust(512, b"\0"))

    def set_fpu(self, fpu: FpuState) -> None:
        head = struct.pack("<HHBxHQQII", fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode, fpu.last_ip, fpu.last_dp,
                           fpu.mxcsr, 0xFFFF)  # fmt: skip
        chunks = [head[:16], head[16:32]] + [bytes(r).ljust(16, b"\0")[:16] for r in fpu.fpr]
        chunks += [bytes(x).ljust(16, b"\0")[:16] for x in fpu.xmm]

        def fill(values):
            for i, chunk in enumerate(chunks):
                ffi.memmove(ffi.addressof(values[i]), chunk, 16)

        self._set(_FPU_NAMES, fill)

    def get_xcr0(self) -> int:
        return self._get64(w.WHvX64RegisterXCr0)[0]

    def set_xcr0(self, value: int) -> None:
        self._set64({w.WHvX64RegisterXCr0: value})

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        out = {}
        for msr in indices:
            if msr == m.MSR_IA32_APIC_BASE:
                out[msr] = self._chip.get_apic_base(self.index)
            elif msr in MSR_REGISTERS:
                out[msr] = self._get64(MSR_REGISTERS[msr])[0]
            elif msr in _SEGMENT_BASE_MSRS:
                values, _ = self._get((_SEGMENT_BASE_MSRS[msr],))
                out[msr] = int(values[0].Segment.Base)
            else:
                out[msr] = self._msr_shadow.get(msr, 0)
        return out

    def set_msrs(self, msrs: dict[int, int]) -> None:
        for msr, value in msrs.items():
            value &= 0xFFFFFFFFFFFFFFFF
            if msr == m.MSR_IA32_APIC_BASE:
                self._chip.set_apic_base(self.index, value)
            elif msr in MSR_REGISTERS:
                self._set64({MSR_REGISTERS[msr]: value})
            elif msr in _SEGMENT_BASE_MSRS:
                name = _SEGMENT_BASE_MSRS[msr]
                values, _ = self._get((name,))
                segment = values[0].Segment
                base, limit, selector, attributes = value, segment.Limit, segment.Selector, segment.Attributes

                def fill(out, base=base, limit=limit, selector=selector, attributes=attributes):
                    s = out[0].Segment
                    s.Base, s.Limit, s.Selector, s.Attributes = base, limit, selector, attributes

                self._set((name,), fill)
            else:
                self._msr_shadow[msr] = value  # MSR exits answer from here

    def get_events(self) -> PendingEvents:
        pending, state = self._get64(*_EVENT_NAMES)
        events = PendingEvents(shadow=SHADOW_STI if state & w.INTERRUPT_STATE_SHADOW else 0,
                               nmi_masked=bool(state & w.INTERRUPT_STATE_NMI_MASKED))  # fmt: skip
        if pending & w.PENDING_INTERRUPTION_PENDING:
            kind = (pending >> w.PENDING_INTERRUPTION_TYPE_SHIFT) & 7
            vector = (pending >> w.PENDING_INTERRUPTION_VECTOR_SHIFT) & 0xFF
            if kind == w.WHvX64PendingNmi:
                events.nmi_injected = True
            elif kind == w.WHvX64PendingException:
                events.exception = vector
                if pending & w.PENDING_INTERRUPTION_DELIVER_ERROR_CODE:
                    events.exception_error_code = pending >> w.PENDING_INTERRUPTION_ERROR_CODE_SHIFT
            else:
                events.interrupt = vector
        return events

    def set_events(self, events: PendingEvents) -> None:
        pending = 0
        if events.exception is not None:
            pending = whv.pending_interruption(events.exception, w.WHvX64PendingException,
                                               error_code=events.exception_error_code)  # fmt: skip
        elif events.nmi_injected:
            pending = whv.pending_interruption(2, w.WHvX64PendingNmi)
        elif events.interrupt is not None:
            pending = whv.pending_interruption(events.interrupt)
        state = (w.INTERRUPT_STATE_SHADOW if events.shadow else 0) | (w.INTERRUPT_STATE_NMI_MASKED if events.nmi_masked else 0)
        self._set64({w.WHvRegisterPendingInterruption: pending, w.WHvRegisterInterruptState: state})

    def save_state(self) -> VcpuState:
        return self._save_state()

    def restore_state(self, state: VcpuState) -> None:
        self._restore_state(state)

    # ------------------------------------------------------------------ interrupts (hvcore's hooks)
    def _interrupts_enabled(self) -> bool:
        return bool(self._get64(w.WHvX64RegisterRflags)[0] & RFLAGS_IF)

    def _window_open(self) -> bool:
        rflags, state, pending = self._get64(*_WINDOW_NAMES)
        return bool(rflags & RFLAGS_IF) and not state & w.INTERRUPT_STATE_SHADOW and not pending & w.PENDING_INTERRUPTION_PENDING

    def _inject(self, vector: int) -> None:
        self._set64({w.WHvRegisterPendingInterruption: whv.pending_interruption(vector)})

    def _inject_nmi(self) -> None:
        self._set64({w.WHvRegisterPendingInterruption: whv.pending_interruption(2, w.WHvX64PendingNmi)})

    def _request_window(self, on: bool) -> None:
        if on == self._window_requested:
            return
        self._set64({w.WHvX64RegisterDeliverabilityNotifications: w.DELIVERABILITY_INTERRUPT if on else 0})
        self._window_requested = on

    def _hv_kick(self) -> None:
        self.lib.WHvCancelRunVirtualProcessor(self._partition, self.index, 0)

    # ------------------------------------------------------------------ running
    def _complete_pending(self) -> None:
        pending, self._pending_in = self._pending_in, None
        if pending is not None:
            data, size, rax, next_rip = pending
            value = int.from_bytes(data, "little")
            if size != 4:  # a 32-bit destination zero-extends into RAX; 8/16-bit ones merge
                mask = (1 << (8 * size)) - 1
                value = (rax & ~mask) | (value & mask)
            self._set64({w.WHvX64RegisterRax: value, w.WHvX64RegisterRip: next_rip})

    def _run_once(self):
        if not self._enter_run():
            return None
        try:
            hr = self.lib.WHvRunVirtualProcessor(self._partition, self.index, self._exit, self._exit_size)
        finally:
            self._left_run()
        context = self._exit
        if w.failed(hr):
            return InternalError("WHvRunVirtualProcessor failed", w.hresult_text(hr), self._safe_rip())
        # these exits come before their instruction completes, and the VMM (or WinHvEmulation) completes
        # it (HLT: the hypervisor did): a single step ends there
        self._completed = context.ExitReason in _COMPLETED_BY_VMM
        return self._dispatch(context.ExitReason, context)

    def _dispatch(self, reason: int, context):
        vp = context.VpContext
        if reason == w.WHvRunVpExitReasonX64IoPortAccess:
            return self._io_exit(context)
        if reason == w.WHvRunVpExitReasonMemoryAccess:
            access = context.MemoryAccess
            if self._vm.in_ram(access.Gpa):
                kind = whv.decode_memory_access(access.AccessInfo).kind
                what = {0: "read of", 1: "write to read-only", 2: "execute of"}.get(kind, "access to")
                return InternalError("memory access exit", f"{what} guest RAM at {access.Gpa:#x}", vp.Rip)
            return self._emulator_call("WHvEmulatorTryMmioEmulation", access, vp.Rip)
        if reason == w.WHvRunVpExitReasonCanceled:
            return None  # a kick: the loop looks at stops, timers and interrupts
        if reason == w.WHvRunVpExitReasonX64InterruptWindow:
            self._window_requested = False  # the notification is consumed by its exit (QEMU re-arms it)
            return None
        if reason == w.WHvRunVpExitReasonX64Halt:
            # the hypervisor has completed the HLT (RIP is past it); an interruption still pending
            # in WHvRegisterPendingInterruption wakes it at once
            if not vp.ExecutionState & w.EXECUTION_STATE_INTERRUPTION_PENDING:
                self._halted = True
            return None
        next_rip = vp.Rip + whv.instruction_length(context)
        if reason == w.WHvRunVpExitReasonX64Cpuid:
            cpuid = context.CpuidAccess
            cr4 = self._get64(w.WHvX64RegisterCr4)[0]
            eax, ebx, ecx, edx = self.cpuid_answer(cpuid.Rax, cpuid.Rcx, cr4)
            self._set64({w.WHvX64RegisterRax: eax, w.WHvX64RegisterRbx: ebx, w.WHvX64RegisterRcx: ecx,
                         w.WHvX64RegisterRdx: edx, w.WHvX64RegisterRip: next_rip})  # fmt: skip
            return None
        if reason == w.WHvRunVpExitReasonX64MsrAccess:
            msr = context.MsrAccess
            if msr.AccessInfo & 1:  # IsWrite
                self.set_msrs({msr.MsrNumber: (msr.Rdx & 0xFFFFFFFF) << 32 | (msr.Rax & 0xFFFFFFFF)})
                self._set64({w.WHvX64RegisterRip: next_rip})
            else:
                value = self.get_msrs([msr.MsrNumber])[msr.MsrNumber]
                self._set64({w.WHvX64RegisterRax: value & 0xFFFFFFFF, w.WHvX64RegisterRdx: value >> 32,
                             w.WHvX64RegisterRip: next_rip})  # fmt: skip
            return None
        if reason == w.WHvRunVpExitReasonException:
            exception = context.VpException
            if exception.ExceptionType in (DB, BP):
                dr6 = self._get64(w.WHvX64RegisterDr6)[0] & 0x400F if exception.ExceptionType == DB else 0
                length = whv.instruction_length(context)
                return self._debug_exception(exception.ExceptionType, vp.Rip, length=length, dr6=dr6)
            return InternalError("unexpected exception exit", f"exception {exception.ExceptionType}", vp.Rip)
        if reason == w.WHvRunVpExitReasonUnrecoverableException:
            return Shutdown("triple fault")
        if reason == w.WHvRunVpExitReasonInvalidVpRegisterValue:
            return InternalError("invalid register value", "WHvRunVirtualProcessor refused the vCPU state", vp.Rip)
        if reason == w.WHvRunVpExitReasonUnsupportedFeature:
            feature = context.UnsupportedFeature
            return InternalError("unsupported feature", f"feature code {feature.FeatureCode}, parameter "
                                 f"{feature.FeatureParameter:#x}", vp.Rip)  # fmt: skip
        return InternalError("unhandled WHPX exit", f"exit reason {reason:#x}", vp.Rip)

    def _io_exit(self, context):
        io = context.IoPortAccess
        access = whv.decode_io_access(io.AccessInfo)
        if access.string:  # the exit has no element address: WinHvEmulation executes it
            return self._emulator_call("WHvEmulatorTryIoEmulation", io, context.VpContext.Rip)
        next_rip = context.VpContext.Rip + whv.instruction_length(context)
        size = access.size
        if not access.is_write:
            data = bytearray(size)
            exit_value = self._port_io(io.PortNumber, memoryview(data), True)
            self._pending_in = (data, size, io.Rax, next_rip)
            if exit_value is not None:
                return exit_value
            self._complete_pending()
            return None
        value = io.Rax & ((1 << (8 * size)) - 1)
        self._set64({w.WHvX64RegisterRip: next_rip})
        return self._port_io(io.PortNumber, value.to_bytes(size, "little"), False)

    def _emulator_call(self, function: str, access_context, rip: int):
        """Hand the exit to WinHvEmulation; its callbacks do the accesses and write the registers."""
        status = ffi.new("WHV_EMULATOR_STATUS *")
        self._callback_error = None
        hr = getattr(self._emulation, function)(self._hv_emulator, self._handle,
                                                 ffi.addressof(self._exit[0], "VpContext"), access_context, status)  # fmt: skip
        error, self._callback_error = self._callback_error, None
        if error is not None:
            if isinstance(error, PyvmmError):
                raise error
            raise AccelError("whpx", f"vCPU {self.index}: emulating the instruction at {rip:#x} failed: {error}") from error
        if w.failed(hr) or not status[0] & w.EMULATOR_STATUS_SUCCESSFUL:
            return InternalError("instruction emulation failed", f"{function}: {w.hresult_text(hr)}, emulator "
                                 f"status {status[0]:#x}", rip)  # fmt: skip
        return None

    def _safe_rip(self) -> int | None:
        try:
            return self._get64(w.WHvX64RegisterRip)[0]
        except AccelError:
            return None

    def close(self) -> None:
        if self._closing:
            return
        self._stop_threads()
        self._emulation.WHvEmulatorDestroyEmulator(self._hv_emulator)
        self.lib.WHvDeleteVirtualProcessor(self._partition, self.index)


WhpxVm.vcpu_class = WhpxVcpu  # defined after the VM class that makes it
