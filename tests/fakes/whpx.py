"""A fake of the Windows Hypervisor Platform: WinHvPlatform.h and WinHvEmulation.h, on a software CPU.

Behaviour followed, with sources (MS: Microsoft's Windows Hypervisor Platform
documentation, MicrosoftDocs/Virtualization-Documentation virtualization/api/
hypervisor-platform, and the headers WinHvPlatformDefs.h, WinHvPlatform.h,
WinHvEmulation.h; QEMU: target/i386/whpx/whpx-all.c, the reference VMM Microsoft
wrote for the API):

* Partitions: WHvCreatePartition, then the properties ProcessorCount,
  ExtendedVmExits and LocalApicEmulationMode, then WHvSetupPartition; those
  properties are refused once the partition is set up, and a partition without a
  processor count cannot be set up (MS "WHvSetupPartition"). CpuidExitList may be
  set after set-up (QEMU sets it from whpx_init_vcpu). GPA ranges and virtual
  processors need a set-up partition; a processor index must be below the count.
* WHvRunVirtualProcessor returns S_OK with an exit context: ExitReason, the
  VpContext (ExecutionState with Cpl, InterruptionPending, InterruptShadow;
  InstructionLength; Cs, Rip, Rflags of the instruction) and the reason's member
  (MS "WHvRunVirtualProcessor" and "Exit contexts"). Exits come before the
  instruction completes; the VMM completes it (QEMU: CPUID and MSR exits set RIP to
  Rip + InstructionLength; I/O and MMIO go through WinHvEmulation).
* Port I/O: X64IoPortAccess with the instruction bytes, AccessInfo (IsWrite,
  AccessSize, StringOp, RepPrefix), port, RAX/RCX/RSI/RDI and DS/ES (MS "I/O port
  access"). An access to an address no GPA range maps: MemoryAccess with the
  instruction bytes, AccessInfo (read 0 / write 1, GpaUnmapped) and the GPA; the
  GVA is not known here (GvaValid 0) and InstructionLength is 0 (VirtualBox's
  NEM notes: lengths of unmapped-GPA exits are not reliable).
* CPUID exits only for the leaves in CpuidExitList when ExtendedVmExits.X64CpuidExit
  is set (MS "WHvPartitionPropertyCodeCpuidExitList"); other leaves are answered by
  the hypervisor: this fake's default answer is all zeros (also the DefaultResult
  fields of an exit).
* HLT: X64Halt once the guest has executed HLT; RIP is past it (QEMU's
  whpx_handle_halt does not move RIP and resumes the guest after the interrupt).
* Injection: WHvRegisterPendingInterruption (Pending, type interrupt 0 / NMI 2 /
  exception 3, vector, error code) is delivered at the next entry where it is
  deliverable (an interrupt needs RFLAGS.IF and no interrupt shadow) and stays
  pending until then: the exit context's ExecutionState.InterruptionPending shows
  it (QEMU whpx_vcpu_post_run). A HLT reached while one is pending and deliverable
  is woken by it, without an exit. WHvX64RegisterDeliverabilityNotifications'
  InterruptNotification gives an X64InterruptWindow exit once an interrupt is
  deliverable; the exit consumes the request (QEMU re-arms it after each one).
* WHvCancelRunVirtualProcessor (any thread) makes a running WHvRunVirtualProcessor
  return with ExitReason Canceled, CancelReason User (MS "Execution Canceled"). A
  cancel of a processor that is not running is dropped here: the documentation
  promises nothing for it, so a VMM must not rely on it.
* A triple fault is UnrecoverableException (MS "Exit contexts").
* WinHvEmulation: WHvEmulatorTryIoEmulation / TryMmioEmulation execute the exit's
  instruction, reading and writing registers only through the
  Get/SetVirtualProcessorRegisters callbacks, ports through the I/O port callback
  and unmapped GPAs through the memory callback, translating the string
  instruction's GVA through the TranslateGvaPage callback; the return status has
  EmulationSuccessful (bit 0) set on success (MS "WHvEmulatorTryIoEmulation").
  This fake's emulator is pyvmm's interpreter stepper, and it reads and writes
  guest RAM directly rather than through the memory callback.

* Exceptions: with ExtendedVmExits.ExceptionExit (bit 2) set, each vector set in the
  ExceptionExitBitmap property (bit n = WHV_EXCEPTION_TYPE n: DebugTrapOrFault 1,
  BreakpointTrap 3) becomes an Exception exit instead of being delivered (MS "Virtual Processor
  Exception": "Exits for exceptions are only generated if they are enabled by setting the
  WHV_EXTENDED_VM_EXITS.ExceptionExit property"), with WHV_VP_EXCEPTION_CONTEXT: the instruction
  bytes, ExceptionInfo (SoftwareException bit 1 for INT3), ExceptionType, and the VpContext's
  InstructionLength; RIP is at the INT3 (QEMU's whpx reads the breakpoint instruction from the
  context's InstructionBytes[0]) and past a trap. The bitmap may also be set after WHvSetupPartition
  (QEMU's whpx_set_exception_exit_bitmap does, while its VM runs). After a #DB exit
  WHvX64RegisterDr6 holds the B0-B3/BS bits (Hyperlight's WHP debugger reads them there). DR0-DR3
  and DR7 (WHvX64RegisterDr0-Dr3, Dr7) are the CPU's debug registers (fakes/cpu.py raises their
  breakpoints); a pending exception in WHvRegisterPendingInterruption is delivered as a hardware
  exception at the current RIP. Guest code the VMM rewrites meanwhile (a debugger's int3s) is what
  the next run executes; this fake's CPU drops its translated code for that at the run after an
  exception exit or a write of a debug register or the bitmap, and otherwise only at the events
  fakes/cpu.py names (a code write after a plain cancel may go unseen here).

The software CPU (fakes/cpu.py) executes RDMSR/WRMSR itself and never makes MSR
exits; ``script_exit`` makes one with the exit context's fields.
"""

from __future__ import annotations

import struct
import sys
import threading

from unicorn import x86_const as x86

from fakes.cpu import Trap, TrappingCpu, new_cpus
from pyvmm.accel.core import EmulationFailure
from pyvmm.accel.interp import engine, system
from pyvmm.accel.x86 import DescriptorTable, PendingEvents, Regs, Segment, SpecialRegs, fpu_from_fxsave, fpu_into_xsave
from pyvmm.errors import AccelError
from pyvmm.ffi.whpx import ffi

# WinHvPlatformDefs.h / winerror.h
S_OK, E_FAIL, E_INVALIDARG, E_NOTIMPL = 0, 0x80004005, 0x80070057, 0x80004001
WHV_E_UNKNOWN_CAPABILITY, WHV_E_INSUFFICIENT_BUFFER, WHV_E_UNKNOWN_PROPERTY = 0x80370300, 0x80370301, 0x80370302
WHV_E_INVALID_PARTITION_CONFIG, WHV_E_VP_ALREADY_EXISTS, WHV_E_VP_DOES_NOT_EXIST = 0x80370304, 0x80370306, 0x80370307
WHV_E_INVALID_VP_STATE, WHV_E_INVALID_VP_REGISTER_NAME = 0x80370308, 0x80370309
WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG = 0x80370303
CAP_HYPERVISOR_PRESENT, CAP_FEATURES, CAP_EXTENDED_VM_EXITS = 0, 1, 2
PROP_EXTENDED_VM_EXITS, PROP_CPUID_EXIT_LIST, PROP_LAPIC_MODE, PROP_PROCESSOR_COUNT = 0x1, 0x1003, 0x1005, 0x1FFF
PROP_EXCEPTION_EXIT_BITMAP = 0x2
SETUP_ONLY_PROPERTIES = (PROP_EXTENDED_VM_EXITS, PROP_LAPIC_MODE, PROP_PROCESSOR_COUNT)
X64_CPUID_EXIT, X64_MSR_EXIT, EXCEPTION_EXIT = 1 << 0, 1 << 1, 1 << 2
EXIT_MEMORY, EXIT_IO, EXIT_UNRECOVERABLE, EXIT_WINDOW, EXIT_HALT = 0x1, 0x2, 0x4, 0x7, 0x8
EXIT_MSR, EXIT_CPUID, EXIT_EXCEPTION, EXIT_CANCELED = 0x1000, 0x1001, 0x1002, 0x2001
PENDING, PENDING_TYPE_SHIFT, PENDING_ERROR_CODE, PENDING_VECTOR_SHIFT = 1, 1, 1 << 4, 16
TYPE_INTERRUPT, TYPE_NMI, TYPE_EXCEPTION = 0, 2, 3
NOTIFY_INTERRUPT = 1 << 1
EXECUTION_INTERRUPTION_PENDING = 1 << 6  # WHV_X64_VP_EXECUTION_STATE.InterruptionPending
STATE_SHADOW, STATE_NMI_MASKED = 1 << 0, 1 << 1
TRANSLATE_SUCCESS, TRANSLATE_PAGE_NOT_PRESENT = 0, 1
RFLAGS_IF = 1 << 9

# WHV_REGISTER_NAME (x64) groups: what each name is, in the fake's register file
GPR_NAMES = tuple(range(0x10)) + (0x10, 0x11)  # RAX RCX RDX RBX RSP RBP RSI RDI R8-R15, RIP, RFLAGS
GPR_FIELDS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
              "r15", "rip", "rflags")  # fmt: skip
SEGMENT_NAMES = {0x12: "es", 0x13: "cs", 0x14: "ss", 0x15: "ds", 0x16: "fs", 0x17: "gs", 0x18: "ldt", 0x19: "tr"}
TABLE_NAMES = {0x1A: "idt", 0x1B: "gdt"}
CR_NAMES = {0x1C: "cr0", 0x1D: "cr2", 0x1E: "cr3", 0x1F: "cr4", 0x20: "cr8", 0x2001: "efer"}
XCR0 = 0x27
FPU_NAMES = {0x1018: 0, 0x1019: 16, **{0x1010 + i: 32 + 16 * i for i in range(8)},
             **{0x1000 + i: 160 + 16 * i for i in range(16)}}  # name -> offset in the FXSAVE image  # fmt: skip
MSR_NAMES = {0x2000: 0x10, 0x2002: 0xC0000102, 0x2004: 0x277, 0x2005: 0x174, 0x2006: 0x176, 0x2007: 0x175,
             0x2008: 0xC0000081, 0x2009: 0xC0000082, 0x200A: 0xC0000083, 0x200B: 0xC0000084, 0x200E: 0x2FF,
             0x207B: 0xC0000103}  # fmt: skip
PENDING_INTERRUPTION, INTERRUPT_STATE, DELIVERABILITY = 0x80000000, 0x80000001, 0x80000004
DR_NAMES = (0x21, 0x22, 0x23, 0x24, 0x25, 0x26)  # DR0-DR3, DR6, DR7
DR6_NAME, DR6_FIXED = 0x25, 0xFFFF0FF0
KEPT_NAMES = {0x2003, PENDING_INTERRUPTION, 0x80000002, DELIVERABILITY, 0x80000005}
EXIT_CONTEXT_SIZE = ffi.sizeof("WHV_RUN_VP_EXIT_CONTEXT")


def _group(name: int) -> str | None:
    if name in GPR_NAMES:
        return "gpr"
    if name in SEGMENT_NAMES or name in TABLE_NAMES or name in CR_NAMES:
        return "sreg"
    if name in FPU_NAMES:
        return "fpu"
    if name in MSR_NAMES:
        return "msr"
    if name == XCR0:
        return "xcr0"
    if name == INTERRUPT_STATE:
        return "state"
    if name in DR_NAMES:
        return "dr"
    if name in KEPT_NAMES:
        return "kept"
    return None


def _attributes(seg: Segment) -> int:
    """WHV_X64_SEGMENT_REGISTER.Attributes: type 0-3, S 4, DPL 5-6, P 7, AVL 12, L 13, D/B 14, G 15."""
    present = seg.present and not seg.unusable
    return (seg.type | seg.s << 4 | seg.dpl << 5 | present << 7 | seg.avl << 12 | seg.l << 13 | seg.db << 14
            | seg.g << 15)  # fmt: skip


def _segment(base: int, limit: int, selector: int, attributes: int) -> Segment:
    present = bool(attributes & 0x80)
    return Segment(base=base, limit=limit, selector=selector, type=attributes & 15, s=bool(attributes & 16),
                   dpl=attributes >> 5 & 3, present=present, avl=bool(attributes & 1 << 12), l=bool(attributes & 1 << 13),
                   db=bool(attributes & 1 << 14), g=bool(attributes & 1 << 15), unusable=not present)  # fmt: skip


def _read_value(group: str, value, out) -> None:
    """One register of the fake's file into a WHV_REGISTER_VALUE."""
    if group == "fpu":
        ffi.memmove(ffi.addressof(out), value, 16)
    elif isinstance(value, tuple) and len(value) == 4:
        out.Segment.Base, out.Segment.Limit, out.Segment.Selector, out.Segment.Attributes = value
    elif isinstance(value, tuple):
        out.Table.Base, out.Table.Limit = value
    else:
        out.Reg128.Low64, out.Reg128.High64 = value & 0xFFFFFFFFFFFFFFFF, 0


def _written_value(name: int, group: str, value):
    if group == "fpu":
        return bytes(ffi.buffer(ffi.addressof(value), 16))
    if name in SEGMENT_NAMES:
        s = value.Segment
        return (int(s.Base), int(s.Limit), int(s.Selector), int(s.Attributes))
    if name in TABLE_NAMES:
        return (int(value.Table.Base), int(value.Table.Limit))
    return int(value.Reg64)


class _FakeVp:
    """One virtual processor: a register file over the software CPU, loaded lazily after each exit."""

    def __init__(self, partition: _Partition, index: int, cpu: TrappingCpu):
        self.partition, self.index, self.cpu = partition, index, cpu
        cpu.halt_completes = True
        self.running = False
        self.kicked = False
        self.file: dict[int, object] = {}
        self.loaded: set[str] = set()
        self.dirty: set[str] = set()
        self.kept: dict[int, int] = {name: 0 for name in KEPT_NAMES}
        self.kept[0x2003] = 0xFEE00900 if index == 0 else 0xFEE00800
        self.scripted: list[dict] = []
        self.before: Regs | None = None
        self.drs: dict[int, int] = {name: 0 for name in DR_NAMES}
        self.drs[DR6_NAME], self.drs[0x26] = DR6_FIXED, 0x400
        self._debug_loaded = None
        self.code_may_change = False  # the VMM may have rewritten guest code (see the module text)

    # --- the register file ------------------------------------------------------------
    def _load_group(self, group: str) -> None:
        cpu, file = self.cpu, self.file
        if group == "gpr":
            regs = cpu.get_regs()
            file.update(zip(GPR_NAMES, (getattr(regs, f) for f in GPR_FIELDS)))
        elif group == "sreg":
            sregs = cpu.get_sregs()
            for name, field in SEGMENT_NAMES.items():
                seg = getattr(sregs, field)
                file[name] = (seg.base, seg.limit, seg.selector, _attributes(seg))
            for name, field in TABLE_NAMES.items():
                table = getattr(sregs, field)
                file[name] = (table.base, table.limit)
            for name, field in CR_NAMES.items():
                file[name] = getattr(sregs, field)
        elif group == "fpu":
            area = fpu_into_xsave(bytes(576), cpu.get_fpu())
            for name, offset in FPU_NAMES.items():
                file[name] = area[offset : offset + 16]
        elif group == "msr":
            values = cpu.get_msrs(list(MSR_NAMES.values()))
            for name, msr in MSR_NAMES.items():
                file[name] = values[msr]
        elif group == "xcr0":
            file[XCR0] = cpu.get_xcr0()
        elif group == "state":
            events = cpu.get_events()
            file[INTERRUPT_STATE] = (STATE_SHADOW if events.shadow else 0) | (STATE_NMI_MASKED if events.nmi_masked else 0)
        self.loaded.add(group)

    def get(self, name: int):
        group = _group(name)
        if group == "kept":
            return group, self.kept[name]
        if group == "dr":
            return group, self.drs[name]
        if group not in self.loaded:
            self._load_group(group)
        return group, self.file[name]

    def put(self, name: int, group: str, value) -> None:
        if group == "kept":
            self.kept[name] = value
            return
        if group == "dr":
            self.drs[name] = value
            self.code_may_change = True
            return
        if group not in self.loaded:
            self._load_group(group)
        self.file[name] = value
        self.dirty.add(group)

    def _push(self, groups) -> None:
        """Entry: the written register groups into the CPU."""
        cpu, file = self.cpu, self.file
        if "sreg" in groups:
            sregs = cpu.get_sregs()
            values = {field: _segment(*file[name]) for name, field in SEGMENT_NAMES.items()}
            values.update({field: DescriptorTable(*file[name]) for name, field in TABLE_NAMES.items()})
            values.update({field: file[name] for name, field in CR_NAMES.items()})
            cpu.set_sregs(SpecialRegs(**values, apic_base=sregs.apic_base))
            cpu.flush_code()  # a mode change, or code the VMM wrote (an AP's trampoline)
        if "gpr" in groups:
            cpu.set_regs(Regs(**{f: file[n] for n, f in zip(GPR_NAMES, GPR_FIELDS)}))
        if "fpu" in groups:
            area = bytearray(512)
            for name, offset in FPU_NAMES.items():
                area[offset : offset + 16] = file[name]
            cpu.set_fpu(fpu_from_fxsave(bytes(area)))
        if "msr" in groups:
            cpu.set_msrs({msr: file[name] for name, msr in MSR_NAMES.items()})
        if "xcr0" in groups:
            cpu.set_xcr0(file[XCR0])
        if "state" in groups:
            events = cpu.get_events()
            events.shadow = 2 if file[INTERRUPT_STATE] & STATE_SHADOW else 0
            events.nmi_masked = bool(file[INTERRUPT_STATE] & STATE_NMI_MASKED)
            cpu.set_events(PendingEvents(**{f: getattr(events, f) for f in events.__dataclass_fields__ if f != "private"}))

    def _load_debug(self) -> None:
        """Entry: the debug registers and the exception exits into the CPU."""
        cpu, drs, partition = self.cpu, self.drs, self.partition
        debug = (tuple(drs[name] for name in DR_NAMES[:4]), drs[0x26], drs[DR6_NAME])
        if debug != self._debug_loaded:
            cpu.set_debug_registers(*debug[:2])
            cpu.set_dr6(debug[2])
            self._debug_loaded = debug
        bitmap = partition.exception_bitmap if partition.extended_exits & EXCEPTION_EXIT else 0
        cpu.intercepted = frozenset(v for v in range(32) if bitmap >> v & 1)
        if self.code_may_change or partition.code_may_change:
            self.code_may_change = partition.code_may_change = False
            cpu.flush_code()
        cpu.begin_run()

    def _entered(self) -> None:
        self.file, self.loaded, self.dirty = {}, set(), set()

    # --- events -------------------------------------------------------------------------
    def _deliverable(self, pending: int) -> bool:
        if (pending >> PENDING_TYPE_SHIFT & 7) != TYPE_INTERRUPT:
            return True
        cpu = self.cpu
        return bool(cpu.uc.reg_read(x86.UC_X86_REG_RFLAGS) & RFLAGS_IF) and not cpu.get_events().shadow

    def _try_inject(self) -> None:
        """Deliver WHvRegisterPendingInterruption through the guest IDT when it is deliverable."""
        pending = self.kept[PENDING_INTERRUPTION]
        if not pending & PENDING or not self._deliverable(pending):
            return
        cpu = self.cpu
        events = cpu.get_events()
        kind, vector = pending >> PENDING_TYPE_SHIFT & 7, pending >> PENDING_VECTOR_SHIFT & 0xFF
        if kind == TYPE_NMI:
            events.nmi_injected = True
        elif kind == TYPE_EXCEPTION:
            events.exception = vector
            if pending & PENDING_ERROR_CODE:
                events.exception_error_code = pending >> 32
        else:
            events.interrupt = vector
        events.shadow = 0
        if len(self.partition.vps) > 1:
            cpu.flush_code()  # as tests/fakes/hvf.py: code other vCPUs wrote (text patching IPIs)
        cpu.set_events(PendingEvents(**{f: getattr(events, f) for f in events.__dataclass_fields__ if f != "private"}))
        self.kept[PENDING_INTERRUPTION] = 0
        cpu.reset_poll()

    def _window_open(self) -> bool:
        return not self.kept[PENDING_INTERRUPTION] & PENDING and self._deliverable(0)

    # --- resuming an instruction the exit came from inside ------------------------------
    def _resume_parked(self) -> str | None:
        cpu = self.cpu
        exit_value, trap = cpu.parked
        if trap.kind == "mmio":  # WinHvEmulation executed it: the VMM's state replaces the engine's copy
            cpu.freeze_ram()
            if "gpr" not in self.loaded:
                self._load_group("gpr")
            self._push(self.dirty | {"gpr"})
            return None
        if self.dirty - {"gpr"}:
            return (f"the VMM changed {sorted(self.dirty - {'gpr'})} registers at the {trap.kind} exit at {trap.rip:#x} "
                    "(this fake completes that instruction itself)")  # fmt: skip
        written = Regs(**{f: self.get(n)[1] for n, f in zip(GPR_NAMES, GPR_FIELDS)})
        if trap.kind == "cpuid":
            cpu.cpuid_answer = tuple(getattr(written, r) & 0xFFFFFFFF for r in ("rax", "rbx", "rcx", "rdx"))
        elif not trap.is_write:
            exit_value.data[:] = (cpu.string_input_bytes(self.before.rdi, trap.size) if trap.string
                                  else (written.rax & ((1 << (8 * trap.size)) - 1)).to_bytes(trap.size, "little"))
        expected = cpu.expected_completion(self.before)
        if written != expected:
            wrong = {f: f"{getattr(written, f):#x} (the instruction gives {getattr(expected, f):#x})"
                     for f in Regs.__dataclass_fields__ if getattr(written, f) != getattr(expected, f)}
            return f"the VMM completed the {trap.kind} exit at {trap.rip:#x} unlike the instruction: {wrong}"
        return None

    # --- running ----------------------------------------------------------------------
    def run(self, context) -> int:
        cpu = self.cpu
        with cpu._cond:
            cpu._stop_requested = False  # a cancel before the run does not carry over
        resuming = cpu.parked is not None
        if resuming:
            cpu.completed_by_vmm = True
            problem = self._resume_parked()
            if problem is not None:
                self.partition.fake.violations.append(problem)
                print(f"fake WHPX: {problem}", file=sys.stderr)
                return WHV_E_INVALID_VP_STATE
            if self.kept[PENDING_INTERRUPTION] & PENDING:
                cpu.request_stop()  # delivered once the parked instruction has completed, at a block boundary
        else:
            self._push(self.dirty)
            if self.scripted:
                self._entered()
                self._fill(context, self.scripted.pop(0))
                return S_OK
            self._try_inject()
        self._load_debug()
        self._entered()
        self.kicked = False
        self.running = True
        try:
            while True:
                window = bool(self.kept[DELIVERABILITY] & NOTIFY_INTERRUPT)
                pending = bool(self.kept[PENDING_INTERRUPTION] & PENDING)
                if window and not resuming and self._window_open():
                    self.kept[DELIVERABILITY] &= ~NOTIFY_INTERRUPT
                    self._fill(context, {"ExitReason": EXIT_WINDOW})
                    return S_OK
                resuming = False
                cpu.arm_poll(window or pending)
                trap = cpu.run_until_trap()
                if trap.kind == "stop":
                    if pending:
                        self._try_inject()
                    if self.kicked:
                        self._fill(context, {"ExitReason": EXIT_CANCELED})
                        return S_OK
                    continue
                if trap.kind == "hlt" and self.kept[PENDING_INTERRUPTION] & PENDING and self._deliverable(self.kept[PENDING_INTERRUPTION]):
                    self._try_inject()  # a pending interruption wakes the HLT (RIP is already past it)
                    continue
                if trap.kind == "cpuid" and not self._cpuid_exits(cpu.get_regs().rax):
                    cpu.cpuid_answer = (0, 0, 0, 0)  # the hypervisor's own answer (see the module text)
                    continue
                return self._trap_exit(trap, context)
        finally:
            self.running = False
            cpu.poll_due = None

    def _cpuid_exits(self, leaf: int) -> bool:
        partition = self.partition
        return bool(partition.extended_exits & X64_CPUID_EXIT) and (leaf & 0xFFFFFFFF) in partition.cpuid_exit_list

    def _trap_exit(self, trap: Trap, context) -> int:
        cpu = self.cpu
        if trap.kind in ("io", "mmio", "cpuid"):
            self.before = cpu.get_regs()
        if trap.kind == "io":
            regs, sregs = self.before, cpu.get_sregs()
            access = int(trap.is_write) | trap.size << 1 | trap.string << 4 | trap.rep << 5
            self._fill(context, {"ExitReason": EXIT_IO, "length": trap.length, "IoPortAccess": {
                "bytes": self._code_bytes(trap.rip), "AccessInfo": access, "PortNumber": trap.port, "Rax": regs.rax,
                "Rcx": regs.rcx, "Rsi": regs.rsi, "Rdi": regs.rdi, "Ds": sregs.ds, "Es": sregs.es}})  # fmt: skip
        elif trap.kind == "mmio":
            access = (1 if trap.is_write else 0) | 1 << 2  # GpaUnmapped
            self._fill(context, {"ExitReason": EXIT_MEMORY, "length": 0, "MemoryAccess": {
                "bytes": self._code_bytes(trap.rip), "AccessInfo": access, "Gpa": trap.addr, "Gva": 0}})  # fmt: skip
        elif trap.kind == "cpuid":
            regs = self.before
            self._fill(context, {"ExitReason": EXIT_CPUID, "length": 2, "CpuidAccess": {
                "Rax": regs.rax, "Rcx": regs.rcx, "Rdx": regs.rdx, "Rbx": regs.rbx}})  # fmt: skip
        elif trap.kind == "hlt":
            self._fill(context, {"ExitReason": EXIT_HALT, "length": 1})
        elif trap.kind == "shutdown":
            self._fill(context, {"ExitReason": EXIT_UNRECOVERABLE})
        elif trap.kind == "exception":
            self.code_may_change = True
            if trap.vector == 1:
                self.drs[DR6_NAME] = DR6_FIXED | trap.dr6
            self._fill(context, {"ExitReason": EXIT_EXCEPTION, "length": trap.length, "VpException": {
                "bytes": self._code_bytes(trap.rip), "ExceptionInfo": 2 if trap.vector == 3 else 0,
                "ExceptionType": trap.vector, "ErrorCode": 0, "ExceptionParameter": 0}})  # fmt: skip
        else:
            self.partition.fake.failures.append(f"the software CPU failed: {trap.detail}")
            return E_FAIL
        return S_OK

    def _code_bytes(self, rip: int) -> bytes:
        state = system.MachineState(self.cpu.uc, self.cpu._ram)
        try:
            return state.read_bytes(state.segs[engine.CS][1] + rip, 16)
        except Exception:  # the page ends: the emulator fetches the rest itself
            return b""

    def _fill(self, context, fields: dict) -> None:
        """The WHV_RUN_VP_EXIT_CONTEXT of an exit (MS "Exit contexts")."""
        ffi.memmove(context, bytes(EXIT_CONTEXT_SIZE), EXIT_CONTEXT_SIZE)
        context.ExitReason = fields["ExitReason"]
        cpu = self.cpu
        regs, sregs, events = cpu.get_regs(), cpu.get_sregs(), cpu.get_events()
        vp = context.VpContext
        vp.ExecutionState = (sregs.cs.dpl & 3 | (sregs.cr0 & 1) << 2 | bool(sregs.efer & 0x400) << 4
                             | bool(self.kept[PENDING_INTERRUPTION] & PENDING) << 6 | bool(events.shadow) << 12)  # fmt: skip
        vp.InstructionLengthCr8 = (fields.get("length", 0) & 0xF) | (sregs.cr8 & 0xF) << 4
        vp.Cs.Base, vp.Cs.Limit, vp.Cs.Selector, vp.Cs.Attributes = (sregs.cs.base, sregs.cs.limit, sregs.cs.selector,
                                                                     _attributes(sregs.cs))  # fmt: skip
        vp.Rip, vp.Rflags = regs.rip, regs.rflags
        for member in ("IoPortAccess", "MemoryAccess", "CpuidAccess", "MsrAccess", "VpException"):
            values = fields.get(member)
            if values is None:
                continue
            target = getattr(context, member)
            for key, value in values.items():
                if key == "bytes":
                    target.InstructionByteCount = len(value)
                    ffi.memmove(target.InstructionBytes, value, len(value))
                elif isinstance(value, Segment):
                    seg = getattr(target, key)
                    seg.Base, seg.Limit, seg.Selector, seg.Attributes = value.base, value.limit, value.selector, _attributes(value)
                else:
                    setattr(target, key, value)


class _Partition:
    def __init__(self, fake: FakeWinHv, ident: int):
        self.fake, self.ident = fake, ident
        self.processor_count = 0
        self.extended_exits = 0
        self.exception_bitmap = 0
        self.code_may_change = False
        self.cpuid_exit_list: set[int] = set()
        self.lapic_mode = 0
        self.set_up = False
        self.cpus = None
        self.vps: dict[int, _FakeVp] = {}
        self.maps: dict[int, tuple[int, int]] = {}
        self._slot = 0


class _EmulatedVcpu:
    """What the fake emulator's stepper sees as the vCPU: registers through the VMM's callbacks only."""

    def __init__(self, callbacks, context, index: int):
        self.callbacks, self.context, self.index = callbacks, context, index

    def _get(self, names):
        values, keep = _register_array(len(names))
        hr = self.callbacks.WHvEmulatorGetVirtualProcessorRegisters(self.context, ffi.new("WHV_REGISTER_NAME[]", names),
                                                                    len(names), values)  # fmt: skip
        if hr & 0xFFFFFFFF:
            raise _CallbackFailed(f"WHvEmulatorGetVirtualProcessorRegisters returned {hr & 0xFFFFFFFF:#x}")
        return values, keep

    def _set(self, names, fill):
        values, keep = _register_array(len(names))
        fill(values)
        hr = self.callbacks.WHvEmulatorSetVirtualProcessorRegisters(self.context, ffi.new("WHV_REGISTER_NAME[]", names),
                                                                    len(names), values)  # fmt: skip
        if hr & 0xFFFFFFFF:
            raise _CallbackFailed(f"WHvEmulatorSetVirtualProcessorRegisters returned {hr & 0xFFFFFFFF:#x}")

    def get_regs(self) -> Regs:
        values, _ = self._get(GPR_NAMES)
        return Regs(**{f: int(values[i].Reg64) for i, f in enumerate(GPR_FIELDS)})

    def set_regs(self, regs: Regs) -> None:
        def fill(values):
            for i, f in enumerate(GPR_FIELDS):
                values[i].Reg64 = getattr(regs, f) & 0xFFFFFFFFFFFFFFFF

        self._set(GPR_NAMES, fill)

    def get_sregs(self) -> SpecialRegs:
        names = tuple(SEGMENT_NAMES) + tuple(TABLE_NAMES) + tuple(CR_NAMES)
        values, _ = self._get(names)
        out = {}
        for i, name in enumerate(names):
            if name in SEGMENT_NAMES:
                s = values[i].Segment
                out[SEGMENT_NAMES[name]] = _segment(s.Base, s.Limit, s.Selector, s.Attributes)
            elif name in TABLE_NAMES:
                out[TABLE_NAMES[name]] = DescriptorTable(values[i].Table.Base, values[i].Table.Limit)
            else:
                out[CR_NAMES[name]] = int(values[i].Reg64)
        return SpecialRegs(**out)

    def set_sregs(self, sregs: SpecialRegs) -> None:
        names = tuple(SEGMENT_NAMES) + tuple(TABLE_NAMES) + tuple(CR_NAMES)

        def fill(values):
            for i, name in enumerate(names):
                if name in SEGMENT_NAMES:
                    seg, s = getattr(sregs, SEGMENT_NAMES[name]), values[i].Segment
                    s.Base, s.Limit, s.Selector, s.Attributes = seg.base, seg.limit, seg.selector, _attributes(seg)
                elif name in TABLE_NAMES:
                    table = getattr(sregs, TABLE_NAMES[name])
                    values[i].Table.Base, values[i].Table.Limit = table.base, table.limit
                else:
                    values[i].Reg64 = getattr(sregs, CR_NAMES[name])

        self._set(names, fill)

    def get_events(self) -> PendingEvents:
        values, _ = self._get((INTERRUPT_STATE,))
        state = int(values[0].Reg64)
        return PendingEvents(shadow=2 if state & STATE_SHADOW else 0, nmi_masked=bool(state & STATE_NMI_MASKED))

    def set_events(self, events: PendingEvents) -> None:
        state = (STATE_SHADOW if events.shadow else 0) | (STATE_NMI_MASKED if events.nmi_masked else 0)

        def fill(values):
            values[0].Reg64 = state

        self._set((INTERRUPT_STATE,), fill)

    def get_fpu(self):
        names = tuple(FPU_NAMES)
        values, _ = self._get(names)
        area = bytearray(512)
        for i, name in enumerate(names):
            area[FPU_NAMES[name] : FPU_NAMES[name] + 16] = bytes(ffi.buffer(ffi.addressof(values[i]), 16))
        return fpu_from_fxsave(bytes(area))

    def set_fpu(self, fpu) -> None:
        area = fpu_into_xsave(bytes(576), fpu)
        names = tuple(FPU_NAMES)

        def fill(values):
            for i, name in enumerate(names):
                ffi.memmove(ffi.addressof(values[i]), area[FPU_NAMES[name] : FPU_NAMES[name] + 16], 16)

        self._set(names, fill)

    def get_xcr0(self) -> int:
        values, _ = self._get((XCR0,))
        return int(values[0].Reg64)

    def set_xcr0(self, value: int) -> None:
        def fill(values):
            values[0].Reg64 = value

        self._set((XCR0,), fill)

    def get_msrs(self, indices):
        by_msr = {msr: name for name, msr in MSR_NAMES.items()}
        out = {}
        for msr in indices:
            if msr not in by_msr:
                raise AccelError("whpx", f"MSR {msr:#x} is not a register")
            values, _ = self._get((by_msr[msr],))
            out[msr] = int(values[0].Reg64)
        return out

    def set_msrs(self, msrs) -> None:
        by_msr = {msr: name for name, msr in MSR_NAMES.items()}
        for msr, value in msrs.items():
            def fill(values, value=value):
                values[0].Reg64 = value

            self._set((by_msr[msr],), fill)


class _CallbackFailed(Exception):
    pass


def _register_array(count: int):
    raw = ffi.new("char[]", 16 * count + 16)
    address = int(ffi.cast("uintptr_t", raw))
    return ffi.cast("WHV_REGISTER_VALUE *", address + (-address % 16)), raw


class _CallbackBus:
    """The stepper's ports or unmapped addresses, reached through the VMM's emulator callbacks."""

    def __init__(self, emulator: _Emulator, mmio: bool):
        self.emulator, self.is_mmio = emulator, mmio

    def read(self, addr: int, data: memoryview) -> None:
        data[:] = self.emulator.access(addr, len(data), None, self.is_mmio)

    def write(self, addr: int, data) -> None:
        self.emulator.access(addr, len(data), bytes(data), self.is_mmio)


class _Emulator:
    def __init__(self, fake: FakeWinHv, callbacks):
        self.fake, self.callbacks = fake, callbacks
        self.context = None
        self.managers: dict[int, object] = {}

    def access(self, addr: int, size: int, data: bytes | None, mmio: bool) -> bytes:
        if mmio:
            info = ffi.new("WHV_EMULATOR_MEMORY_ACCESS_INFO *", {"GpaAddress": addr, "Direction": int(data is not None),
                                                                 "AccessSize": size})  # fmt: skip
            if data is not None:
                ffi.memmove(info.Data, data, size)
            hr = self.callbacks.WHvEmulatorMemoryCallback(self.context, info)
            if hr & 0xFFFFFFFF:
                raise _CallbackFailed(f"WHvEmulatorMemoryCallback returned {hr & 0xFFFFFFFF:#x}")
            return bytes(ffi.buffer(info.Data, size))
        info = ffi.new("WHV_EMULATOR_IO_ACCESS_INFO *", {"Direction": int(data is not None), "Port": addr,
                                                         "AccessSize": size,
                                                         "Data": int.from_bytes(data or b"", "little")})  # fmt: skip
        hr = self.callbacks.WHvEmulatorIoPortCallback(self.context, info)
        if hr & 0xFFFFFFFF:
            raise _CallbackFailed(f"WHvEmulatorIoPortCallback returned {hr & 0xFFFFFFFF:#x}")
        return (info.Data & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _translate(self, gva: int, write: bool) -> None:
        """The string instruction's memory operand through the VMM's TranslateGvaPage callback."""
        result, gpa = ffi.new("WHV_TRANSLATE_GVA_RESULT_CODE *"), ffi.new("WHV_GUEST_PHYSICAL_ADDRESS *")
        hr = self.callbacks.WHvEmulatorTranslateGvaPage(self.context, gva, 2 if write else 1, result, gpa)
        if hr & 0xFFFFFFFF or result[0] != TRANSLATE_SUCCESS:
            raise _CallbackFailed(f"WHvEmulatorTranslateGvaPage({gva:#x}) returned {hr & 0xFFFFFFFF:#x}, result {result[0]}")

    def emulate(self, partition: _Partition, context, vp_context, io, string: bool, is_write: bool) -> int:
        from pyvmm.accel.fallback.manager import FallbackManager
        from pyvmm.accel.hvcore import SlotMemory

        vcpu = _EmulatedVcpu(self.callbacks, context, 0)  # the emulator knows no VP, only the callbacks' Context
        self.context = context
        try:
            if string:
                regs = vcpu.get_regs()
                sregs = vcpu.get_sregs()
                gva = (sregs.ds.base + regs.rsi) if is_write else (sregs.es.base + regs.rdi)
                self._translate(gva, write=not is_write)
            manager = self.managers.get(id(partition))
            if manager is None:
                cpus = partition.cpus
                memory = SlotMemory({slot: (addr, cpus.slot_view(slot)) for slot, (addr, *_) in cpus.slots.items()})
                manager = self.managers[id(partition)] = FallbackManager(
                    memory, _CallbackBus(self, False), _CallbackBus(self, True), frozenset(),
                    hypervisor="fake WinHvEmulation", why="emulates")  # fmt: skip
            manager(vcpu, EmulationFailure(vp_context.Rip, bytes(io.InstructionBytes[0:io.InstructionByteCount])))
        except Exception as err:  # a failed callback or an instruction the emulator cannot execute
            self.fake.emulation_failures.append(f"{type(err).__name__}: {err}")
            print(f"fake WinHvEmulation: {type(err).__name__}: {err}", file=sys.stderr)
            return 0
        return 1  # EmulationSuccessful


class FakeWinHv:
    """The libraries ``ffi.whpx.load()`` returns (both, in one object), faked; see the module text."""

    def __init__(self):
        self.hypervisor_present = True
        #: what WHvSetupPartition returns (a test sets WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG)
        self.setup_result = S_OK
        self.partitions: dict[int, _Partition] = {}
        self.emulators: dict[int, _Emulator] = {}
        #: VMM mistakes at exits taken inside an instruction (WHvRunVirtualProcessor then fails)
        self.violations: list[str] = []
        self.failures: list[str] = []
        self.emulation_failures: list[str] = []
        self.calls: list[str] = []
        self._next = 1
        self._lock = threading.Lock()

    def _new_id(self) -> int:
        with self._lock:
            ident, self._next = self._next, self._next + 1
        return ident

    def _partition(self, handle) -> _Partition | None:
        return self.partitions.get(int(ffi.cast("uintptr_t", handle)))

    def _vp(self, handle, index) -> _FakeVp | None:
        partition = self._partition(handle)
        return None if partition is None else partition.vps.get(int(index))

    # --- capabilities and partitions --------------------------------------------------
    def WHvGetCapability(self, code, buffer, size, written) -> int:
        values = {CAP_HYPERVISOR_PRESENT: int(self.hypervisor_present), CAP_FEATURES: 0,
                  CAP_EXTENDED_VM_EXITS: X64_CPUID_EXIT | X64_MSR_EXIT | 1 << 2}  # fmt: skip
        if code not in values:
            return WHV_E_UNKNOWN_CAPABILITY
        if size < 4:
            return WHV_E_INSUFFICIENT_BUFFER
        out = struct.pack("<Q", values[code])[: min(8, size)]
        ffi.memmove(buffer, out, len(out))
        if written != ffi.NULL:
            written[0] = len(out)
        return S_OK

    def WHvCreatePartition(self, handle) -> int:
        ident = self._new_id()
        self.partitions[ident] = _Partition(self, ident)
        handle[0] = ffi.cast("WHV_PARTITION_HANDLE", ident)
        return S_OK

    def WHvSetPartitionProperty(self, handle, code, buffer, size) -> int:
        partition = self._partition(handle)
        if partition is None:
            return E_INVALIDARG
        if partition.set_up and code in SETUP_ONLY_PROPERTIES:
            return WHV_E_INVALID_PARTITION_CONFIG
        data = bytes(ffi.buffer(ffi.cast("char *", buffer), size))
        if code == PROP_PROCESSOR_COUNT and size >= 4:
            partition.processor_count = struct.unpack_from("<I", data)[0]
        elif code == PROP_EXTENDED_VM_EXITS and size >= 8:
            partition.extended_exits = struct.unpack_from("<Q", data)[0]
        elif code == PROP_LAPIC_MODE and size >= 4:
            partition.lapic_mode = struct.unpack_from("<I", data)[0]
        elif code == PROP_EXCEPTION_EXIT_BITMAP and size >= 8:
            partition.exception_bitmap = struct.unpack_from("<Q", data)[0]
            partition.code_may_change = True
        elif code == PROP_CPUID_EXIT_LIST and size % 4 == 0:
            partition.cpuid_exit_list = set(struct.unpack(f"<{size // 4}I", data))
        elif code in (PROP_PROCESSOR_COUNT, PROP_EXTENDED_VM_EXITS, PROP_LAPIC_MODE, PROP_CPUID_EXIT_LIST,
                      PROP_EXCEPTION_EXIT_BITMAP):
            return WHV_E_INSUFFICIENT_BUFFER
        else:
            return WHV_E_UNKNOWN_PROPERTY
        return S_OK

    def WHvSetupPartition(self, handle) -> int:
        partition = self._partition(handle)
        if partition is None or partition.set_up:
            return E_INVALIDARG
        if not partition.processor_count:
            return WHV_E_INVALID_PARTITION_CONFIG
        if self.setup_result:
            return self.setup_result
        partition.cpus = new_cpus(partition.processor_count)
        partition.set_up = True
        return S_OK

    def WHvDeletePartition(self, handle) -> int:
        partition = self._partition(handle)
        if partition is None:
            return E_INVALIDARG
        for vp in list(partition.vps.values()):
            vp.cpu.close()
        if partition.cpus is not None:
            partition.cpus.close()
        del self.partitions[partition.ident]
        return S_OK

    def WHvMapGpaRange(self, handle, source, gpa, size, flags) -> int:
        import ctypes

        partition = self._partition(handle)
        if partition is None or not partition.set_up:
            return WHV_E_INVALID_PARTITION_CONFIG if partition else E_INVALIDARG
        address = int(ffi.cast("uintptr_t", source))
        if gpa % 4096 or size % 4096 or not size or address % 4096 or not flags & 1:
            return E_INVALIDARG
        buffer = (ctypes.c_char * size).from_address(address)
        partition._slot += 1
        partition.cpus.map_memory(partition._slot, gpa, buffer, readonly=not flags & 2)
        partition.maps[gpa] = (size, partition._slot)
        return S_OK

    def WHvUnmapGpaRange(self, handle, gpa, size) -> int:
        partition = self._partition(handle)
        if partition is None or gpa not in partition.maps or partition.maps[gpa][0] != size:
            return E_INVALIDARG
        _, slot = partition.maps.pop(gpa)
        partition.cpus.slots.pop(slot)
        partition.cpus._buffers.pop(slot)
        return S_OK

    # --- virtual processors -------------------------------------------------------------
    def WHvCreateVirtualProcessor(self, handle, index, flags) -> int:
        partition = self._partition(handle)
        if partition is None or not partition.set_up:
            return WHV_E_INVALID_PARTITION_CONFIG if partition else E_INVALIDARG
        if not 0 <= index < partition.processor_count or flags:
            return E_INVALIDARG
        if index in partition.vps:
            return WHV_E_VP_ALREADY_EXISTS
        cpu = partition.cpus.vcpus[index] = TrappingCpu(partition.cpus, index)
        partition.vps[index] = _FakeVp(partition, index, cpu)
        return S_OK

    def WHvDeleteVirtualProcessor(self, handle, index) -> int:
        vp = self._vp(handle, index)
        if vp is None:
            return WHV_E_VP_DOES_NOT_EXIST
        vp.cpu.close()
        del vp.partition.vps[int(index)]
        return S_OK

    def WHvRunVirtualProcessor(self, handle, index, context, size) -> int:
        vp = self._vp(handle, index)
        if vp is None:
            return WHV_E_VP_DOES_NOT_EXIST
        if size < EXIT_CONTEXT_SIZE:
            return WHV_E_INSUFFICIENT_BUFFER
        return vp.run(ffi.cast("WHV_RUN_VP_EXIT_CONTEXT *", context))

    def WHvCancelRunVirtualProcessor(self, handle, index, flags) -> int:
        vp = self._vp(handle, index)
        if vp is None:
            return WHV_E_VP_DOES_NOT_EXIST
        if vp.running:
            vp.kicked = True
            vp.cpu.request_stop()
        return S_OK

    def WHvGetVirtualProcessorRegisters(self, handle, index, names, count, values) -> int:
        vp = self._vp(handle, index)
        if vp is None:
            return WHV_E_VP_DOES_NOT_EXIST
        if int(ffi.cast("uintptr_t", values)) % 16:
            return E_INVALIDARG  # WHV_REGISTER_VALUE is DECLSPEC_ALIGN(16)
        for i in range(count):
            if _group(names[i]) is None:
                return WHV_E_INVALID_VP_REGISTER_NAME
        for i in range(count):
            group, value = vp.get(names[i])
            _read_value(group, value, values[i])
        return S_OK

    def WHvSetVirtualProcessorRegisters(self, handle, index, names, count, values) -> int:
        vp = self._vp(handle, index)
        if vp is None:
            return WHV_E_VP_DOES_NOT_EXIST
        if int(ffi.cast("uintptr_t", values)) % 16:
            return E_INVALIDARG
        for i in range(count):
            if _group(names[i]) is None:
                return WHV_E_INVALID_VP_REGISTER_NAME
        for i in range(count):
            name = names[i]
            group = _group(name)
            vp.put(name, group, _written_value(name, group, values[i]))
        return S_OK

    def WHvTranslateGva(self, handle, index, gva, flags, result, gpa) -> int:
        vp = self._vp(handle, index)
        if vp is None:
            return WHV_E_VP_DOES_NOT_EXIST
        state = system.MachineState(vp.cpu.uc, vp.cpu._ram)
        try:
            gpa[0] = state.translate(gva, bool(flags & 2), False)
            result.ResultCode = TRANSLATE_SUCCESS
        except system.Fault:
            result.ResultCode = TRANSLATE_PAGE_NOT_PRESENT
        return S_OK

    def WHvRequestInterrupt(self, handle, control, size) -> int:
        return WHV_E_INVALID_PARTITION_CONFIG  # needs the hypervisor's APIC (LocalApicEmulationMode), off here

    def WHvQueryGpaRangeDirtyBitmap(self, handle, gpa, size, bitmap, bitmap_size) -> int:
        return E_NOTIMPL

    # --- WinHvEmulation -----------------------------------------------------------------
    def WHvEmulatorCreateEmulator(self, callbacks, handle) -> int:
        if callbacks.Size != ffi.sizeof("WHV_EMULATOR_CALLBACKS"):
            return E_INVALIDARG
        ident = self._new_id()
        self.emulators[ident] = _Emulator(self, callbacks)
        handle[0] = ffi.cast("WHV_EMULATOR_HANDLE", ident)
        return S_OK

    def WHvEmulatorDestroyEmulator(self, handle) -> int:
        return S_OK if self.emulators.pop(int(ffi.cast("uintptr_t", handle)), None) else E_INVALIDARG

    def _emulate(self, handle, context, vp_context, access, status, io: bool) -> int:
        emulator = self.emulators.get(int(ffi.cast("uintptr_t", handle)))
        if emulator is None:
            return E_INVALIDARG
        partition = next((p for p in self.partitions.values()
                          if any(vp.cpu.parked is not None for vp in p.vps.values())), None)  # fmt: skip
        if partition is None:
            return E_INVALIDARG
        if io:
            info = access.AccessInfo
            status[0] = emulator.emulate(partition, context, vp_context, access, bool(info & 1 << 4), bool(info & 1))
        else:
            status[0] = emulator.emulate(partition, context, vp_context, access, False, False)
        return S_OK

    def WHvEmulatorTryIoEmulation(self, handle, context, vp_context, io_context, status) -> int:
        return self._emulate(handle, context, vp_context, io_context, status, io=True)

    def WHvEmulatorTryMmioEmulation(self, handle, context, vp_context, mmio_context, status) -> int:
        return self._emulate(handle, context, vp_context, mmio_context, status, io=False)

    # --- for contract tests ---------------------------------------------------------------
    def script_exit(self, vp_index: int, exit_reason: int, member: str | None = None, length: int = 0, **fields) -> None:
        """Make the next WHvRunVirtualProcessor of ``vp_index`` (in the only partition) return this exit."""
        (partition,) = self.partitions.values()
        spec = {"ExitReason": exit_reason, "length": length}
        if member:
            spec[member] = fields
        partition.vps[vp_index].scripted.append(spec)
