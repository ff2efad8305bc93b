"""A fake of Hypervisor.framework's Intel (VMX) API: the functions of hv.h / hv_vmx.h, on a software CPU.

Behaviour followed, with sources (Apple: Hypervisor.framework headers hv.h, hv_vmx.h,
hv_arch_vmx.h, hv_arch_x86.h, hv_error.h and their documentation pages; SDM: Intel
SDM vol. 3C):

* One VM per process; hv_vm_create again before hv_vm_destroy is HV_BUSY (hv.h).
* hv_vcpu_create binds the vCPU to the calling thread; every hv_vcpu_* and
  hv_vmx_vcpu_* call except hv_vcpu_interrupt must come from that thread (hv.h
  "must be called by the owning thread"). Here a call from another thread returns
  HV_BAD_ARGUMENT and is recorded in ``thread_violations``.
* hv_vcpu_run_until returns HV_SUCCESS on every exit the VMM must handle; the exit
  reason, qualification, instruction length and guest-physical address are in the
  VMCS read-only fields (SDM 24.9, 27.2). The guest state is loaded from the VMCS
  at entry and saved to it at exit (SDM 26.3.2, 27.3); the VM-entry
  interruption-information valid bit is cleared on every exit (SDM 24.8.3).
* Port I/O exits when "unconditional I/O exiting" is on, before the instruction
  executes, with qualification size-1, direction (1 = in), string, REP and port
  (SDM Table 27-5); HLT exits when "HLT exiting" is on (SDM 25.1.3); CPUID always
  exits (SDM 25.1.2). Instruction lengths are in VMCS_RO_VMEXIT_INSTR_LEN (SDM 27.2.5).
* A data access to a guest-physical address hv_vm_map did not map is an EPT violation
  before the instruction executes: qualification bit 0 read / bit 1 write, bits 7
  and 8 (a data access through a linear address), the address in
  VMCS_GUEST_PHYSICAL_ADDRESS (SDM Table 27-7, 28.3.3.2). This fake does not know
  the linear address: VMCS_RO_GUEST_LIN_ADDR reads 0.
* Injection through VMCS_CTRL_VMENTRY_IRQ_INFO is delivered through the guest IDT at
  entry; an external interrupt needs RFLAGS.IF = 1 and no STI/MOV-SS blocking, or
  the entry fails (SDM 26.3.1.5). With "interrupt-window exiting" on, the exit
  comes as soon as IF = 1 with no blocking (SDM 25.2).
* Entry checks (SDM 26.2, 26.3.1.1): controls within hv_vmx_read_capability's
  allowed-0/allowed-1 settings; CR0.NE and CR4.VMXE set in the guest CR0/CR4
  (IA32_VMX_CR0_FIXED0 / CR4_FIXED0; PE and PG may be 0 with unrestricted guest);
  "IA-32e mode guest" equal to EFER.LMA. A failed entry is exit reason 33 with bit 31
  set (SDM 26.8).
* An event injected at an exit this fake took from inside its instruction (port
  I/O, CPUID: fakes/cpu.py) is delivered once that instruction has completed, at the
  next block boundary (an interrupt arriving a little later); an exit before that
  hands it back as IDT-vectoring information (SDM 27.2.4) for the VMM to inject again,
  except a HLT, which the event wakes (on hardware it was delivered before the HLT).
* hv_vcpu_interrupt forces a running vCPU out with exit reason 1 (external
  interrupt). A kick of a vCPU that is not in hv_vcpu_run is dropped here: the
  documentation promises nothing for that case, so a VMM must not rely on it.
* MOV to CR0/CR4 of a bit set in the guest/host mask exits (SDM 25.1.3). This fake's
  CPU cannot trap MOV to CR (nor RDMSR/WRMSR, XSETBV): a guest write of a host-owned
  bit takes effect and, at the next exit, the guest CR0/CR4 field and read shadow
  both show it, and "IA-32e mode guest" follows EFER.LMA (as KVM's nested VMX
  prepare_vmcs12 does for an L1). Those exits are produced by ``script_exit``.
* Debug exceptions (fakes/cpu.py raises them as the CPU does: TF, INT3, DR0-DR3/DR7). An
  exception whose bit is set in VMCS_CTRL_EXC_BITMAP exits instead of being delivered (SDM
  25.2), with exit reason 0 "exception or NMI" and the VM-exit interruption information
  (vector; type 3 hardware exception for #DB, 6 software exception for INT3, SDM 24.9.2); for
  INT3 RIP stays on the instruction and VMCS_RO_VMEXIT_INSTR_LEN is 1 (SDM 27.1, 27.2.5); for
  #DB the exit qualification holds B0-B3 (bits 0-3) and BS (bit 14), and DR6 is not changed
  (SDM 27.1, Table 27-1). DR7 is the VMCS guest-state field VMCS_GUEST_DR7 (SDM 24.4.1; "load
  debug controls" is a required-1 entry control here), which hv_vcpu_read/write_register(HV_X86_DR7)
  also reach; DR0-DR3 and DR6 are hv_x86_reg_t registers (hv_arch_x86.h). An injected software
  exception (type 6) pushes RIP + VMCS_CTRL_VMENTRY_INSTR_LEN (SDM 26.6.1.3).
  Guest code the VMM rewrites meanwhile (a debugger's int3s) is what the next entry executes on
  hardware; this fake's CPU drops its translated code for that at the entry after an exception
  exit or a write of the exception bitmap or a debug register, and otherwise only at the events
  fakes/cpu.py names (a code write after a plain kick may go unseen here).
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys
import threading

from unicorn import x86_const as x86

from fakes.cpu import Trap, TrappingCpu, new_cpus
from pyvmm.accel.interp import system
from pyvmm.accel.x86 import PendingEvents, Regs, Segment, fpu_from_fxsave, fpu_into_xsave
from pyvmm.ffi.hvf import intel as ffi

# hv_error.h
HV_SUCCESS, HV_ERROR, HV_BUSY, HV_BAD_ARGUMENT, HV_UNSUPPORTED = 0, 0xFAE94001, 0xFAE94002, 0xFAE94003, 0xFAE9400F
HV_MEMORY_READ, HV_MEMORY_WRITE, HV_MEMORY_EXEC = 1, 2, 4
# hv_arch_x86.h: hv_x86_reg_t
REGISTERS = ("rip", "rflags", "rax", "rcx", "rdx", "rbx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
             "r12", "r13", "r14", "r15", "cs", "ss", "ds", "es", "fs", "gs", "idt_base", "idt_limit", "gdt_base",
             "gdt_limit", "ldtr", "ldt_base", "ldt_limit", "ldt_ar", "tr", "tss_base", "tss_limit", "tss_ar", "cr0",
             "cr1", "cr2", "cr3", "cr4", "dr0", "dr1", "dr2", "dr3", "dr4", "dr5", "dr6", "dr7", "tpr", "xcr0")  # fmt: skip
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip", "rflags")  # fmt: skip
# hv_arch_vmx.h: VMCS field encodings (SDM appendix B)
SEGMENT_FIELDS = {"es": (0x800, 0x4800, 0x4814, 0x6806), "cs": (0x802, 0x4802, 0x4816, 0x6808),
                  "ss": (0x804, 0x4804, 0x4818, 0x680A), "ds": (0x806, 0x4806, 0x481A, 0x680C),
                  "fs": (0x808, 0x4808, 0x481C, 0x680E), "gs": (0x80A, 0x480A, 0x481E, 0x6810),
                  "ldt": (0x80C, 0x480C, 0x4820, 0x6812), "tr": (0x80E, 0x480E, 0x4822, 0x6814)}  # fmt: skip
GDTR_LIMIT, GDTR_BASE, IDTR_LIMIT, IDTR_BASE = 0x4810, 0x6816, 0x4812, 0x6818
GUEST_CR0, GUEST_CR3, GUEST_CR4, GUEST_RSP, GUEST_RIP, GUEST_RFLAGS = 0x6800, 0x6802, 0x6804, 0x681C, 0x681E, 0x6820
GUEST_EFER, GUEST_PAT, GUEST_INTERRUPTIBILITY, GUEST_DR7 = 0x2806, 0x2804, 0x4824, 0x681A
PIN, CPU, CPU2, EXIT_CTLS, ENTRY_CTLS, EXC_BITMAP = 0x4000, 0x4002, 0x401E, 0x400C, 0x4012, 0x4004
ENTRY_IRQ_INFO, ENTRY_ERROR, ENTRY_INSTR_LEN = 0x4016, 0x4018, 0x401A
CR0_MASK, CR4_MASK, CR0_SHADOW, CR4_SHADOW = 0x6000, 0x6002, 0x6004, 0x6006
EXIT_REASON, EXIT_IRQ_INFO, IDT_VECTOR_INFO, EXIT_INSTR_LEN = 0x4402, 0x4404, 0x4408, 0x440C
EXIT_QUALIFICATION, GUEST_LINEAR, GUEST_PHYSICAL = 0x6400, 0x640A, 0x2400
IRQ_WINDOW_EXITING, HLT_EXITING, UNCOND_IO_EXITING = 1 << 2, 1 << 7, 1 << 24
ENTRY_IA32E = 1 << 9
# capabilities: allowed-0 settings (bits that must be 1) low, allowed-1 settings high (SDM A.3-A.5)
CAPABILITIES = {
    0: (0x16, 0x7F),  # pin-based: ext-int, NMI exiting, virtual NMIs, preemption timer
    1: (0x0401E172, 0xFFFFFFFE),  # primary processor-based
    2: (0, 0x000000AB),  # secondary: APIC access, EPT, RDTSCP, unrestricted guest
    3: (0x11FF, 0x0000D3FF),  # VM-entry: IA-32e mode guest, load PAT/EFER
    4: (0x36DFF, 0x003FFFFF),  # VM-exit
}
EXIT_EXCEPTION_OR_NMI, EXIT_EXTERNAL_INTERRUPT, EXIT_TRIPLE_FAULT, EXIT_IRQ_WINDOW, EXIT_CPUID = 0, 1, 2, 7, 10
EXIT_HLT, EXIT_IO, EXIT_ENTRY_FAILURE, EXIT_EPT_VIOLATION = 12, 30, 33, 48
CR0_PG, CR0_NE, CR4_PAE, CR4_VMXE, EFER_LME, EFER_LMA, RFLAGS_IF = 1 << 31, 1 << 5, 1 << 5, 1 << 13, 1 << 8, 1 << 10, 1 << 9
NATIVE_MSR_ALLOWED = frozenset({0x10, 0x174, 0x175, 0x176, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,
                                0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103})  # fmt: skip


def _ar(seg: Segment) -> int:
    """SDM Table 24-2: type 0-3, S 4, DPL 5-6, P 7, AVL 12, L 13, D/B 14, G 15, unusable 16."""
    if seg.unusable or not seg.present:
        return 1 << 16
    return (seg.type | seg.s << 4 | seg.dpl << 5 | 1 << 7 | seg.avl << 12 | seg.l << 13 | seg.db << 14 | seg.g << 15)


def _segment(selector: int, base: int, limit: int, ar: int) -> Segment:
    unusable = bool(ar & 1 << 16)
    return Segment(base=base, limit=limit, selector=selector, type=ar & 15, s=bool(ar & 16), dpl=ar >> 5 & 3,
                   present=bool(ar & 128) and not unusable, avl=bool(ar & 1 << 12), l=bool(ar & 1 << 13),
                   db=bool(ar & 1 << 14), g=bool(ar & 1 << 15), unusable=unusable)  # fmt: skip


class _FakeVcpu:
    def __init__(self, fake: FakeHypervisorFramework, ident: int, cpu: TrappingCpu):
        self.fake, self.id, self.cpu = fake, ident, cpu
        self.owner = threading.get_ident()
        self.running = False
        self.kicked = False
        self.native_msrs: set[int] = set()
        self.vmcs: dict[int, int] = {PIN: CAPABILITIES[0][0], CPU: CAPABILITIES[1][0], CPU2: 0,
                                     ENTRY_CTLS: CAPABILITIES[3][0], EXIT_CTLS: CAPABILITIES[4][0]}  # fmt: skip
        self.gprs: dict[str, int] = {}
        self.other: dict[str, int] = {"cr2": 0, "tpr": 0, "xcr0": 1, **{f"dr{i}": 0 for i in range(7)}}
        self.other["dr6"] = 0xFFFF0FF0
        self.vmcs[GUEST_DR7] = 0x400
        self._debug_loaded = None
        self.code_may_change = False  # the VMM may have rewritten guest code (see the module text)
        self.scripted: list[dict] = []
        self._save()

    # --- the guest-state area ---------------------------------------------------------
    def _save(self) -> None:
        """VM exit: the CPU's state into the VMCS guest-state area and the register file (SDM 27.3)."""
        cpu, vmcs = self.cpu, self.vmcs
        regs, sregs = cpu.get_regs(), cpu.get_sregs()
        self.gprs = {name: getattr(regs, name) for name in GPRS}
        for name, (sel, limit, ar, base) in SEGMENT_FIELDS.items():
            seg = getattr(sregs, name)
            vmcs[sel], vmcs[limit], vmcs[ar], vmcs[base] = seg.selector, seg.limit, _ar(seg), seg.base
        vmcs[GDTR_BASE], vmcs[GDTR_LIMIT] = sregs.gdt.base, sregs.gdt.limit
        vmcs[IDTR_BASE], vmcs[IDTR_LIMIT] = sregs.idt.base, sregs.idt.limit
        for field, mask, shadow, value, entered in ((GUEST_CR0, CR0_MASK, CR0_SHADOW, sregs.cr0, "cr0"),
                                                    (GUEST_CR4, CR4_MASK, CR4_SHADOW, sregs.cr4, "cr4")):
            host_owned = vmcs.get(mask, 0)
            changed = (value ^ getattr(self, f"entered_{entered}", value)) & host_owned
            vmcs[shadow] = (vmcs.get(shadow, 0) & ~changed) | (value & changed)
            vmcs[field] = (value & ~host_owned) | (vmcs.get(field, 0) & host_owned & ~changed) | (value & changed)
        vmcs[GUEST_CR3] = sregs.cr3
        vmcs[GUEST_EFER] = sregs.efer
        entry = vmcs[ENTRY_CTLS]
        vmcs[ENTRY_CTLS] = (entry | ENTRY_IA32E) if sregs.efer & EFER_LMA else (entry & ~ENTRY_IA32E)
        self.other["cr2"], self.other["tpr"] = sregs.cr2, sregs.cr8 << 4
        self.other["xcr0"] = cpu.get_xcr0()
        shadow = cpu.get_events().shadow
        vmcs[GUEST_INTERRUPTIBILITY] = (vmcs.get(GUEST_INTERRUPTIBILITY, 0) & ~3) | (1 if shadow & 2 else 0) | (2 if shadow & 1 else 0)
        self._saved = (dict(self.gprs), {k: vmcs.get(k) for k in self._guest_fields()}, dict(self.other))

    @staticmethod
    def _guest_fields():
        fields = [f for group in SEGMENT_FIELDS.values() for f in group]
        return fields + [GDTR_BASE, GDTR_LIMIT, IDTR_BASE, IDTR_LIMIT, GUEST_CR0, GUEST_CR3, GUEST_CR4, GUEST_EFER,
                         CR0_SHADOW, CR4_SHADOW, CR0_MASK, CR4_MASK]  # fmt: skip

    def _check_entry(self) -> str | None:
        """The VM-entry checks this fake makes (SDM 26.2-26.3); a problem is an entry failure."""
        vmcs = self.vmcs
        for field, index in ((PIN, 0), (CPU, 1), (CPU2, 2), (ENTRY_CTLS, 3), (EXIT_CTLS, 4)):
            must, may = CAPABILITIES[index]
            if vmcs[field] & must != must or vmcs[field] & ~may:
                return f"control {field:#x} = {vmcs[field]:#x} outside the capability"
        if not vmcs[GUEST_CR0] & CR0_NE:
            return "guest CR0.NE is 0 (IA32_VMX_CR0_FIXED0)"
        if not vmcs[GUEST_CR4] & CR4_VMXE:
            return "guest CR4.VMXE is 0 (IA32_VMX_CR4_FIXED0)"
        if bool(vmcs[ENTRY_CTLS] & ENTRY_IA32E) != bool(vmcs[GUEST_EFER] & EFER_LMA):
            return "IA-32e mode guest differs from EFER.LMA"
        info = vmcs.get(ENTRY_IRQ_INFO, 0)
        if info >> 31 and not self._deliverable(info, self.gprs["rflags"], vmcs.get(GUEST_INTERRUPTIBILITY, 0)):
            return "external interrupt injected with RFLAGS.IF = 0 or STI/MOV-SS blocking"
        return None

    @staticmethod
    def _deliverable(info: int, rflags: int, blocking: int) -> bool:
        return (info >> 8 & 7) != 0 or (bool(rflags & RFLAGS_IF) and not blocking & 3)

    def _guest_state_changed(self) -> bool:
        _, saved_fields, saved_other = self._saved
        return saved_fields != {k: self.vmcs.get(k) for k in self._guest_fields()} or saved_other != self.other

    def _load_state(self, *, force: bool = False) -> None:
        """VM entry: the guest-state area into the CPU (SDM 26.3.2), what changed since the exit."""
        vmcs, cpu = self.vmcs, self.cpu
        saved_gprs, _, saved_other = self._saved
        if self._guest_state_changed():
            sregs = cpu.get_sregs()
            for name, (sel, limit, ar, base) in SEGMENT_FIELDS.items():
                setattr(sregs, name, _segment(vmcs[sel], vmcs[base], vmcs[limit], vmcs[ar]))
            sregs.gdt.base, sregs.gdt.limit = vmcs[GDTR_BASE], vmcs[GDTR_LIMIT]
            sregs.idt.base, sregs.idt.limit = vmcs[IDTR_BASE], vmcs[IDTR_LIMIT]
            # the CPU runs with the guest's view of CR0/CR4 (host-owned bits from the read shadows)
            sregs.cr0 = (vmcs[GUEST_CR0] & ~vmcs.get(CR0_MASK, 0)) | (vmcs.get(CR0_SHADOW, 0) & vmcs.get(CR0_MASK, 0))
            sregs.cr4 = (vmcs[GUEST_CR4] & ~vmcs.get(CR4_MASK, 0)) | (vmcs.get(CR4_SHADOW, 0) & vmcs.get(CR4_MASK, 0))
            sregs.cr3, sregs.efer, sregs.cr2, sregs.cr8 = vmcs[GUEST_CR3], vmcs[GUEST_EFER], self.other["cr2"], self.other["tpr"] >> 4
            cpu.set_sregs(sregs)
            if self.other["xcr0"] != saved_other["xcr0"]:
                cpu.set_xcr0(self.other["xcr0"])
            cpu.flush_code()  # a mode change, or new code from the VMM (an AP's trampoline)
        entered = cpu.get_sregs()
        self.entered_cr0, self.entered_cr4 = entered.cr0, entered.cr4
        if force or self.gprs != saved_gprs:
            cpu.set_regs(Regs(**self.gprs))

    def _load_debug(self) -> None:
        """Entry: the debug registers and the exception bitmap into the CPU (it raises and stops on them)."""
        cpu, other = self.cpu, self.other
        debug = (tuple(other[f"dr{i}"] for i in range(4)), self.vmcs.get(GUEST_DR7, 0), other["dr6"])
        if debug != self._debug_loaded:
            cpu.set_debug_registers(*debug[:2])
            cpu.set_dr6(debug[2])
            self._debug_loaded = debug
        bitmap = self.vmcs.get(EXC_BITMAP, 0)
        cpu.intercepted = frozenset(v for v in range(32) if bitmap >> v & 1)
        if self.code_may_change:
            self.code_may_change = False
            cpu.flush_code()
        cpu.begin_run()

    def _inject(self, info: int) -> None:
        """Deliver the event of an interruption-information word through the guest IDT (SDM 26.6)."""
        cpu = self.cpu
        events = cpu.get_events()
        blocking = self.vmcs.get(GUEST_INTERRUPTIBILITY, 0)
        events.shadow = (2 if blocking & 1 else 0) | (1 if blocking & 2 else 0)
        if info >> 31:
            kind, vector = info >> 8 & 7, info & 0xFF
            if kind == 2:
                events.nmi_injected = True
            elif kind in (0, 4):
                events.interrupt, events.interrupt_soft = vector, kind == 4
            elif kind in (5, 6):  # a software exception (INT3, INTO, INT1): the return RIP is past it
                regs = cpu.get_regs()
                cpu.set_regs(dataclasses.replace(regs, rip=regs.rip + self.vmcs.get(ENTRY_INSTR_LEN, 0)))
                cpu.set_events(PendingEvents(shadow=0))
                if cpu._memory_changed:
                    cpu._sync_memory()
                system.deliver(cpu.uc, vector, software=kind == 6, ram=cpu._ram)
                return
            else:
                events.exception = vector
                if info & 1 << 11:
                    events.exception_error_code = self.vmcs.get(ENTRY_ERROR, 0)
            events.shadow = 0
            if len(self.fake.vcpus) > 1:
                # code another vCPU's engine wrote is not seen as self-modifying by this one; an interrupt
                # (an IPI of Linux's text patching among them) is where the interpreter flushes too
                cpu.flush_code()
        cpu.set_events(PendingEvents(**{f: getattr(events, f) for f in events.__dataclass_fields__ if f != "private"}))

    def _resume_parked(self) -> str | None:
        """The exit came from inside its instruction (see fakes/cpu.py): hand the VMM's result to the
        instruction, and refuse a VMM that completed it unlike the instruction would."""
        cpu = self.cpu
        exit_value, trap = cpu.parked
        if trap.kind == "mmio":  # the VMM executed the instruction: its state replaces the engine's copy
            cpu.freeze_ram()
            self._load_state(force=True)
            return None
        if self._guest_state_changed():
            return (f"the VMM changed guest state beyond the GPRs at the {trap.kind} exit at {trap.rip:#x} "
                    "(this fake completes that instruction itself)")  # fmt: skip
        before = Regs(**self._saved[0])
        if trap.kind == "cpuid":
            cpu.cpuid_answer = tuple(self.gprs[r] & 0xFFFFFFFF for r in ("rax", "rbx", "rcx", "rdx"))
        elif not trap.is_write:
            exit_value.data[:] = (cpu.string_input_bytes(before.rdi, trap.size) if trap.string
                                  else (self.gprs["rax"] & ((1 << (8 * trap.size)) - 1)).to_bytes(trap.size, "little"))
        expected, written = cpu.expected_completion(before), Regs(**self.gprs)
        if written != expected:
            wrong = {f: f"{getattr(written, f):#x} (the instruction gives {getattr(expected, f):#x})"
                     for f in Regs.__dataclass_fields__ if getattr(written, f) != getattr(expected, f)}
            return f"the VMM completed the {trap.kind} exit at {trap.rip:#x} unlike the instruction: {wrong}"
        return None

    def _window_open(self) -> bool:
        cpu = self.cpu
        return bool(cpu.uc.reg_read(x86.UC_X86_REG_RFLAGS) & RFLAGS_IF) and not cpu.get_events().shadow

    # --- running ----------------------------------------------------------------------
    def run(self) -> int:
        vmcs, cpu = self.vmcs, self.cpu
        problem = self._check_entry()
        if problem is not None:
            self.fake.entry_failures.append(problem)
            self._exit({EXIT_REASON: EXIT_ENTRY_FAILURE | 1 << 31}, save=False)
            return HV_SUCCESS
        info = vmcs.get(ENTRY_IRQ_INFO, 0)
        vmcs[ENTRY_IRQ_INFO] = info & ~(1 << 31)  # consumed by this entry
        with cpu._cond:
            cpu._stop_requested = False  # a kick before the run does not carry over
        deferred = None
        resuming = cpu.parked is not None
        if resuming:
            cpu.completed_by_vmm = True
            problem = self._resume_parked()
            if problem is not None:
                self.fake.violations.append(problem)
                print(f"fake Hypervisor.framework: {problem}", file=sys.stderr)
                return HV_ERROR
            if info >> 31:  # delivered once the parked instruction has completed, at a block boundary
                deferred = info
                cpu.request_stop()
        else:
            self._load_state()
            if self.scripted:  # entered, and the scripted exit came at once
                self._exit(self.scripted.pop(0))
                return HV_SUCCESS
            self._inject(info)
        self._load_debug()
        self.kicked = False
        self.running = True
        if info >> 31:
            cpu.reset_poll()
        try:
            while True:
                window = bool(vmcs[CPU] & IRQ_WINDOW_EXITING)
                if window and not resuming and deferred is None and self._window_open():
                    self._exit({EXIT_REASON: EXIT_IRQ_WINDOW})
                    return HV_SUCCESS
                resuming = False
                cpu.arm_poll(window or deferred is not None)
                trap = cpu.run_until_trap()
                if trap.kind == "stop":
                    if deferred is not None and self._deliverable(deferred, cpu.get_regs().rflags,
                                                                  1 if cpu.get_events().shadow else 0):
                        self._inject(deferred)
                        deferred = None
                    elif self.kicked:
                        self._exit({EXIT_REASON: EXIT_EXTERNAL_INTERRUPT}, vectoring=deferred)
                        return HV_SUCCESS
                    continue  # a window poll, or the deferred event waits
                if trap.kind == "hlt" and deferred is not None and cpu.uc.reg_read(x86.UC_X86_REG_RFLAGS) & RFLAGS_IF:
                    # the event went in at entry on hardware, before the HLT: it wakes the HLT (the
                    # return address is past it) instead of an exit handing it back
                    cpu.set_regs(dataclasses.replace(cpu.get_regs(), rip=trap.rip + trap.length))
                    self._inject(deferred)
                    deferred = None
                    continue
                return self._trap_exit(trap, vmcs, deferred)
        finally:
            self.running = False
            cpu.poll_due = None

    def _trap_exit(self, trap: Trap, vmcs, vectoring: int | None) -> int:
        """The exit for ``trap``; an injected event not delivered yet is handed back as IDT-vectoring
        information (SDM 27.2.4), for the VMM to inject again."""
        if trap.kind == "io":
            if not vmcs[CPU] & UNCOND_IO_EXITING:
                self.fake.entry_failures.append("port I/O with unconditional I/O exiting off (this fake has no ports)")
                return HV_ERROR
            qualification = ((trap.size - 1) | (0 if trap.is_write else 8) | trap.string << 4 | trap.rep << 5
                             | trap.port << 16)  # fmt: skip
            self._exit({EXIT_REASON: EXIT_IO, EXIT_QUALIFICATION: qualification, EXIT_INSTR_LEN: trap.length}, vectoring=vectoring)
        elif trap.kind == "mmio":
            qualification = (2 if trap.is_write else 1) | 1 << 7 | 1 << 8
            self._exit({EXIT_REASON: EXIT_EPT_VIOLATION, EXIT_QUALIFICATION: qualification, GUEST_PHYSICAL: trap.addr,
                        GUEST_LINEAR: 0, EXIT_INSTR_LEN: 0}, vectoring=vectoring)  # fmt: skip
        elif trap.kind == "cpuid":
            self._exit({EXIT_REASON: EXIT_CPUID, EXIT_INSTR_LEN: 2}, vectoring=vectoring)
        elif trap.kind == "hlt":
            if not vmcs[CPU] & HLT_EXITING:
                self.fake.entry_failures.append("HLT with HLT exiting off (this fake cannot wait for interrupts)")
                return HV_ERROR
            self._exit({EXIT_REASON: EXIT_HLT, EXIT_INSTR_LEN: 1}, vectoring=vectoring)
        elif trap.kind == "shutdown":
            self._exit({EXIT_REASON: EXIT_TRIPLE_FAULT})
        elif trap.kind == "exception":
            self.code_may_change = True
            kind = 6 if trap.vector == 3 else 3  # INT3: software exception; #DB: hardware exception
            self._exit({EXIT_REASON: EXIT_EXCEPTION_OR_NMI, EXIT_IRQ_INFO: 1 << 31 | kind << 8 | trap.vector,
                        EXIT_INSTR_LEN: trap.length, EXIT_QUALIFICATION: trap.dr6 & 0x400F}, vectoring=vectoring)  # fmt: skip
        else:
            self.fake.entry_failures.append(f"the software CPU failed: {trap.detail}")
            return HV_ERROR
        return HV_SUCCESS

    def _exit(self, fields: dict, *, save: bool = True, vectoring: int | None = None) -> None:
        vmcs = self.vmcs
        for field in (EXIT_QUALIFICATION, EXIT_INSTR_LEN, GUEST_PHYSICAL, GUEST_LINEAR, EXIT_IRQ_INFO, IDT_VECTOR_INFO):
            vmcs[field] = 0
        vmcs.update(fields)
        if vectoring is not None:
            vmcs[IDT_VECTOR_INFO] = vectoring
        if save:
            self._save()


class FakeHypervisorFramework:
    """The library object ``ffi.hvf.load(ffi.hvf.intel)`` returns, faked; see the module text."""

    def __init__(self):
        self.cpus = None
        self.vcpus: dict[int, _FakeVcpu] = {}
        self.maps: dict[int, tuple[int, int]] = {}
        self.thread_violations: list[str] = []
        self.entry_failures: list[str] = []
        #: VMM mistakes at exits taken inside an instruction (hv_vcpu_run_until then returns HV_ERROR)
        self.violations: list[str] = []
        self._next_id = 0
        self._slot = 0

    # --- VM -------------------------------------------------------------------------
    def hv_vm_create(self, flags) -> int:
        if self.cpus is not None:
            return HV_BUSY
        self.cpus = new_cpus(64)
        return HV_SUCCESS

    def hv_vm_destroy(self) -> int:
        if self.cpus is None or self.vcpus:
            return HV_BUSY if self.vcpus else HV_ERROR
        self.cpus.close()
        self.cpus, self.maps = None, {}
        return HV_SUCCESS

    def hv_capability(self, capability, value) -> int:
        if capability != 0:
            return HV_BAD_ARGUMENT
        value[0] = 64
        return HV_SUCCESS

    def hv_vmx_read_capability(self, field, value) -> int:
        if field not in CAPABILITIES:
            return HV_BAD_ARGUMENT
        must, may = CAPABILITIES[field]
        value[0] = must | may << 32
        return HV_SUCCESS

    def hv_vm_map(self, uva, gpa, size, flags) -> int:
        if self.cpus is None:
            return HV_ERROR
        if gpa % 4096 or size % 4096 or not size or not flags & HV_MEMORY_READ:
            return HV_BAD_ARGUMENT
        address = int(ffi.cast("uintptr_t", uva))
        if address % 4096:
            return HV_BAD_ARGUMENT
        buffer = (ctypes.c_char * size).from_address(address)
        self._slot += 1
        self.cpus.map_memory(self._slot, gpa, buffer, readonly=not flags & HV_MEMORY_WRITE)
        self.maps[gpa] = (size, self._slot)
        return HV_SUCCESS

    def hv_vm_unmap(self, gpa, size) -> int:
        if gpa not in self.maps or self.maps[gpa][0] != size:
            return HV_BAD_ARGUMENT
        _, slot = self.maps.pop(gpa)
        self.cpus.slots.pop(slot)
        self.cpus._buffers.pop(slot)
        return HV_SUCCESS

    # --- vCPUs ------------------------------------------------------------------------
    def _vcpu(self, ident, what: str) -> _FakeVcpu | None:
        vcpu = self.vcpus.get(int(ident))
        if vcpu is None:
            return None
        if threading.get_ident() != vcpu.owner:
            self.thread_violations.append(f"{what} on vCPU {ident} from a thread that does not own it")
            return None
        return vcpu

    def hv_vcpu_create(self, ident, flags) -> int:
        if self.cpus is None:
            return HV_ERROR
        index = self._next_id
        self._next_id += 1
        cpu = self.cpus.vcpus[index] = TrappingCpu(self.cpus, index)
        self.vcpus[index] = _FakeVcpu(self, index, cpu)
        ident[0] = index
        return HV_SUCCESS

    def hv_vcpu_destroy(self, ident) -> int:
        vcpu = self._vcpu(ident, "hv_vcpu_destroy")
        if vcpu is None:
            return HV_BAD_ARGUMENT
        vcpu.cpu.close()
        del self.vcpus[int(ident)]
        return HV_SUCCESS

    def hv_vcpu_run_until(self, ident, deadline) -> int:
        vcpu = self._vcpu(ident, "hv_vcpu_run_until")
        return HV_BAD_ARGUMENT if vcpu is None else vcpu.run()

    def hv_vcpu_interrupt(self, idents, count) -> int:
        for i in range(count):
            vcpu = self.vcpus.get(int(idents[i]))
            if vcpu is None:
                return HV_BAD_ARGUMENT
            if vcpu.running:
                vcpu.kicked = True
                vcpu.cpu.request_stop()
        return HV_SUCCESS

    def hv_vcpu_read_register(self, ident, reg, value) -> int:
        vcpu = self._vcpu(ident, "hv_vcpu_read_register")
        if vcpu is None or not 0 <= reg < len(REGISTERS):
            return HV_BAD_ARGUMENT
        name = REGISTERS[reg]
        if name == "dr7":
            value[0] = vcpu.vmcs.get(GUEST_DR7, 0)
        elif name in vcpu.gprs:
            value[0] = vcpu.gprs[name]
        elif name in vcpu.other:
            value[0] = vcpu.other[name]
        else:
            return HV_BAD_ARGUMENT  # segment state is read through the VMCS here
        return HV_SUCCESS

    def hv_vcpu_write_register(self, ident, reg, value) -> int:
        vcpu = self._vcpu(ident, "hv_vcpu_write_register")
        if vcpu is None or not 0 <= reg < len(REGISTERS):
            return HV_BAD_ARGUMENT
        name = REGISTERS[reg]
        if name.startswith("dr"):
            vcpu.code_may_change = True
        if name == "dr7":
            vcpu.vmcs[GUEST_DR7] = int(value)
        elif name in vcpu.gprs:
            vcpu.gprs[name] = int(value)
        elif name in vcpu.other:
            vcpu.other[name] = int(value)
        else:
            return HV_BAD_ARGUMENT
        return HV_SUCCESS

    def hv_vcpu_read_fpstate(self, ident, buffer, size) -> int:
        vcpu = self._vcpu(ident, "hv_vcpu_read_fpstate")
        if vcpu is None or size < 4096:
            return HV_BAD_ARGUMENT
        area = fpu_into_xsave(bytes(4096), vcpu.cpu.get_fpu())
        ffi.buffer(buffer, 4096)[:] = area
        return HV_SUCCESS

    def hv_vcpu_write_fpstate(self, ident, buffer, size) -> int:
        vcpu = self._vcpu(ident, "hv_vcpu_write_fpstate")
        if vcpu is None or size < 4096:
            return HV_BAD_ARGUMENT
        vcpu.cpu.set_fpu(fpu_from_fxsave(bytes(ffi.buffer(buffer, 4096))))
        return HV_SUCCESS

    def hv_vcpu_enable_native_msr(self, ident, msr, enable) -> int:
        vcpu = self._vcpu(ident, "hv_vcpu_enable_native_msr")
        if vcpu is None or msr not in NATIVE_MSR_ALLOWED:
            return HV_BAD_ARGUMENT
        (vcpu.native_msrs.add if enable else vcpu.native_msrs.discard)(msr)
        return HV_SUCCESS

    def hv_vcpu_read_msr(self, ident, msr, value) -> int:
        vcpu = self._vcpu(ident, "hv_vcpu_read_msr")
        if vcpu is None or msr not in vcpu.native_msrs:
            return HV_BAD_ARGUMENT
        value[0] = vcpu.cpu.get_msrs([msr])[msr]
        return HV_SUCCESS

    def hv_vcpu_write_msr(self, ident, msr, value) -> int:
        vcpu = self._vcpu(ident, "hv_vcpu_write_msr")
        if vcpu is None or msr not in vcpu.native_msrs:
            return HV_BAD_ARGUMENT
        vcpu.cpu.set_msrs({msr: int(value)})
        return HV_SUCCESS

    def hv_vcpu_invalidate_tlb(self, ident) -> int:
        vcpu = self._vcpu(ident, "hv_vcpu_invalidate_tlb")
        if vcpu is None:
            return HV_BAD_ARGUMENT
        vcpu.cpu.flush_code()
        return HV_SUCCESS

    def hv_vmx_vcpu_read_vmcs(self, ident, field, value) -> int:
        vcpu = self._vcpu(ident, "hv_vmx_vcpu_read_vmcs")
        if vcpu is None:
            return HV_BAD_ARGUMENT
        if field in (GUEST_RIP, GUEST_RSP, GUEST_RFLAGS):
            value[0] = vcpu.gprs[{GUEST_RIP: "rip", GUEST_RSP: "rsp", GUEST_RFLAGS: "rflags"}[field]]
        else:
            value[0] = vcpu.vmcs.get(int(field), 0)
        return HV_SUCCESS

    def hv_vmx_vcpu_write_vmcs(self, ident, field, value) -> int:
        vcpu = self._vcpu(ident, "hv_vmx_vcpu_write_vmcs")
        if vcpu is None:
            return HV_BAD_ARGUMENT
        if field in (GUEST_RIP, GUEST_RSP, GUEST_RFLAGS):
            vcpu.gprs[{GUEST_RIP: "rip", GUEST_RSP: "rsp", GUEST_RFLAGS: "rflags"}[field]] = int(value)
        elif field >> 10 & 3 == 1:  # read-only data fields (SDM B: bits 11:10 = 1)
            return HV_BAD_ARGUMENT
        else:
            if field in (EXC_BITMAP, GUEST_DR7):
                vcpu.code_may_change = True
            vcpu.vmcs[int(field)] = int(value)
        return HV_SUCCESS

    # --- for contract tests -------------------------------------------------------------
    def script_exit(self, ident: int, fields: dict) -> None:
        """Make the next hv_vcpu_run_until of ``ident`` return this exit (VMCS field -> value)."""
        self.vcpus[ident].scripted.append(fields)
