"""Execute one guest instruction in software against guest memory and the VMM's buses.

A service for any backend that meets an instruction it cannot finish itself:
the fallback manager (KVM's emulator failed), and later hypervisors that report
an MMIO access without decoding the instruction (HVF's EPT violations). The
caller moves the vCPU state in (``load``), steps, and reads back what changed
(``snapshot`` before and after).

The engine maps the *same* guest RAM as the hypervisor (no copy); every other
guest-physical address and every port is forwarded synchronously to the VMM's
buses, right inside the hook, on the calling thread. With ``kernel_irqchip``
(the hypervisor emulates the LAPIC/IOAPIC/PIC/PIT itself) an access to those
devices cannot be served here: the step is refused with a reason naming it.

LOCK-prefixed instructions stepped here are not atomic against other vCPUs the
hypervisor runs meanwhile (unicorn emulates them as plain read-modify-write);
the fallback's CPUID policy keeps guests with several vCPUs away from the one
that matters (CMPXCHG16B).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from unicorn import UC_ERR_INSN_INVALID, UcError
from unicorn import x86_const as x86

from pyvmm.accel.interp import engine, system
from pyvmm.accel.x86 import CpuidTable
from pyvmm.accel.interp.engine import NEVER, Engine, cache_to_segment, host_tsc
from pyvmm.accel.x86 import CpuidEntry, FpuState, PendingEvents, Regs, SpecialRegs
from pyvmm.arch.x86.msrs import MSR_IA32_TSC as MSR_TSC
from pyvmm.arch.x86.pc import IOAPIC_BASE, IRQCHIP_PORTS, LAPIC_BASE, PAGE_SIZE

#: XCR0 components the interpreter's XSAVE/XRSTOR implement: x87 and SSE
INTERP_XSTATE = 0x3

#: MSRs moved with the full state (FS/GS base travel in the segment caches, EFER in sregs)
TRANSFER_MSRS = (
    0x174, 0x175, 0x176,  # SYSENTER_CS/ESP/EIP
    0x1A0,  # MISC_ENABLE
    0x277,  # PAT
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,  # STAR LSTAR CSTAR FMASK
    0xC0000102,  # KERNEL_GS_BASE
    0xC0000103,  # TSC_AUX
)  # fmt: skip

_REG_FIELDS = tuple(Regs.__dataclass_fields__)


class StepRefused(Exception):
    """The step cannot be completed here (a device the hypervisor owns, an unknown instruction)."""


@dataclass
class MovedState:
    """The vCPU state one step needs; ``full`` adds FPU/XSAVE and XCR0, ``msrs`` the MSRs."""

    regs: Regs
    sregs: SpecialRegs
    events: PendingEvents | None
    full: bool
    xsave: bytes | None = None
    fpu: FpuState | None = None
    xcr0: int | None = None
    msrs: dict | None = None


class Stepper(system.EngineHooks):
    """An engine that executes one instruction at a time on the VMM's guest memory and buses.

    Used from one thread (the vCPU's). ``cpuid`` is the vCPU's CPUID table (what a
    stepped CPUID answers).
    """

    def __init__(self, index: int, memory, pio, mmio, cpuid: list[CpuidEntry], *, kernel_irqchip: bool = True):
        self.index = index
        self.pio, self.mmio = pio, mmio
        self.kernel_irqchip = kernel_irqchip
        self.engine = Engine()
        self.uc = self.engine.uc
        self._cpuid = CpuidTable(list(cpuid)) if cpuid else None
        self.apic_base = LAPIC_BASE
        self._pending = None
        self._refused: str | None = None
        self._system_loaded = None  # CR0/CR3/CR4/EFER/GDTR/IDTR as last written (None: unknown)
        ram = []
        for region in memory.regions:
            export = (ctypes.c_char * region.size).from_buffer(region.buffer)
            self.engine.keep_alive(export)
            ram.append((region.guest_addr, region.size, ctypes.addressof(export), False))
        self.engine.map_memory(ram, self._mmio_read, self._mmio_write)
        self.engine.install_hooks(self)
        if getattr(memory, "tracking_writes", False):
            # a Diff snapshot needs the pages stepped instructions write: the hypervisor's
            # dirty log does not see this engine's stores
            self.engine.on_ram_write(memory.mark_written)

    def close(self) -> None:
        self.engine.close()
        self.uc = None

    # ------------------------------------------------------------ hooks
    def _refuse(self, what: str) -> None:
        if self._refused is None:
            self._refused = what
        self.uc.emu_stop()  # checked after the access: the instruction is abandoned, not completed

    def _irqchip_page(self, addr: int) -> str | None:
        if not self.kernel_irqchip:
            return None
        page = addr & ~(PAGE_SIZE - 1)
        if page == self.apic_base & ~(PAGE_SIZE - 1):
            return "LAPIC"
        if page == IOAPIC_BASE:
            return "IOAPIC"
        return None

    def _mmio_read(self, uc, offset, size, base):
        addr = base + offset
        owner = self._irqchip_page(addr)
        if owner is not None:
            self._refuse(f"a read of {owner} register {addr:#x} (the hypervisor's in-kernel irqchip serves it)")
            return 0
        data = bytearray(size)
        self.mmio.read(addr, memoryview(data))
        return int.from_bytes(data, "little")

    def _mmio_write(self, uc, offset, size, value, base):
        addr = base + offset
        owner = self._irqchip_page(addr)
        if owner is not None:
            self._refuse(f"a write of {owner} register {addr:#x} (the hypervisor's in-kernel irqchip serves it)")
            return
        self.mmio.write(addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def _on_in(self, uc, port, size, _):
        if self.kernel_irqchip and port in IRQCHIP_PORTS:
            self._refuse(f"an in from port {port:#x} (the hypervisor's in-kernel PIC/PIT serves it)")
            return 0
        data = bytearray(size)
        self.pio.read(port, memoryview(data))
        return int.from_bytes(data, "little")

    def _on_out(self, uc, port, size, value, _):
        if self.kernel_irqchip and port in IRQCHIP_PORTS:
            self._refuse(f"an out to port {port:#x} (the hypervisor's in-kernel PIC/PIT serves it)")
            return
        self.pio.write(port, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def _on_interrupt(self, uc, vector, _):
        self._pending = system.exception_record(uc, vector)
        uc.emu_stop()

    # ------------------------------------------------------------ state in
    def load(self, state: MovedState) -> None:
        """Put ``state`` into the engine: one context patch, plus the register API only for what needs it."""
        eng, uc = self.engine, self.uc
        sregs, regs = state.sregs, state.regs
        self.apic_base = sregs.apic_base or LAPIC_BASE
        # CR0/CR3/CR4/EFER/GDTR/IDTR through the engine's own helpers (they keep its mode bits
        # and TLB right), and only when they differ from what the engine holds already.
        system_regs = (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, sregs.gdt.base, sregs.gdt.limit,
                       sregs.idt.base, sregs.idt.limit)  # fmt: skip
        if system_regs != self._system_loaded:
            eng.write_system_regs(sregs)
            self._system_loaded = system_regs
        if state.full:
            eng.write_fpu(state.fpu)
            for msr, value in (state.msrs or {}).items():
                if msr != MSR_TSC:
                    uc.reg_write(x86.UC_X86_REG_MSR, (msr, value))
        blob = engine.Blob(uc)
        eng.write_gprs(blob, regs)
        blob.write("<Q", engine.CR0 + 16, sregs.cr2)
        eng.write_caches(blob, sregs, regs.rflags, shadow=bool(state.events and state.events.shadow))
        if state.full:
            blob.write("<Q", eng.layout.xcr0, state.xcr0)
            if state.msrs and MSR_TSC in state.msrs:
                blob.write("<Q", engine.TSC_OFFSET, (state.msrs[MSR_TSC] - host_tsc()) & engine.U64)
        blob.restore()
        uc.reg_write(x86.UC_X86_REG_RFLAGS, regs.rflags)  # the engine keeps flags in lazy form
        # The guest may have rewritten code and page tables while the hypervisor ran it.
        eng.flush()

    # ------------------------------------------------------------ state out
    def snapshot(self, full: bool, msrs: bool = False) -> dict:
        """The engine state a step can change, for before/after comparison (one context save)."""
        eng, uc = self.engine, self.uc
        blob = engine.Blob(uc)
        snap = {
            "gprs": eng.read_gprs(blob) + (uc.reg_read(x86.UC_X86_REG_RFLAGS),),
            "segments": tuple(blob.segment(i) for i in range(8)),
            "crs": blob.read("<QQQQQ", engine.CR0),  # CR0..CR4
            "gdt": blob.segment(8)[1:3],
            "idt": blob.segment(9)[1:3],
            "efer": blob.read("<Q", engine.EFER)[0],
            "shadow": bool(blob.hflags & engine.HF_INHIBIT_IRQ),
        }
        if full:
            snap["fpu"] = eng.read_fpu()
            snap["xcr0"] = blob.read("<Q", eng.layout.xcr0)[0]
        if msrs:
            snap["msrs"] = {msr: uc.reg_read(x86.UC_X86_REG_MSR, msr) for msr in TRANSFER_MSRS}
        return snap

    @staticmethod
    def regs_of(snap: dict) -> Regs:
        return Regs(**dict(zip(_REG_FIELDS, snap["gprs"])))

    @staticmethod
    def segment_of(snap: dict, index: int):
        return cache_to_segment(*snap["segments"][index])

    def instruction_bytes(self, state: MovedState, size: int = 15) -> bytes:
        """The bytes at the state's RIP, read through the guest's page tables."""
        self.load(MovedState(state.regs, state.sregs, None, False))
        machine = system.MachineState(self.uc)
        return machine.read_bytes(machine.segs[engine.CS][1] + machine.rip, size)

    # ------------------------------------------------------------ the step
    def _set_ac(self, rip: int, length: int, value: bool) -> str | None:
        """``clac``/``stac``: #UD unless CPL 0 with CR4.SMAP, else RFLAGS.AC = value."""
        uc = self.uc
        cpl = self.engine.hflags & engine.HF_CPL_MASK
        if cpl or not uc.reg_read(x86.UC_X86_REG_CR4) & (1 << 21):
            system.deliver(uc, system.UD)
            return f"exception {system.UD}"
        rflags = uc.reg_read(x86.UC_X86_REG_RFLAGS)
        uc.reg_write(x86.UC_X86_REG_RFLAGS, (rflags | system.AC) if value else (rflags & ~system.AC))
        uc.reg_write(x86.UC_X86_REG_RIP, rip + length)
        return None

    def deliver_event(self, events: PendingEvents) -> str | None:
        """Deliver an event the hypervisor was injecting (it comes before the instruction); what it was."""
        try:
            if events.exception is not None:
                system.deliver(self.uc, events.exception, error_code=events.exception_error_code)
                return f"exception {events.exception}"
            if events.nmi_injected:
                system.deliver(self.uc, system.NMI, external=True)
                return "NMI"
            if events.interrupt is not None:
                system.deliver(self.uc, events.interrupt, software=events.interrupt_soft,
                               external=not events.interrupt_soft)  # fmt: skip
                return f"interrupt {events.interrupt}"
        except system.TripleFault as err:
            raise StepRefused(f"triple fault while delivering an injected event ({err})") from err
        except system.Unsupported as err:
            raise StepRefused(str(err)) from err
        return None

    def step(self, rip: int, mnemonic: str = "", length: int = 0) -> str | None:
        """Execute the instruction at ``rip``; returns the exception it raised (delivered), if any.

        ``mnemonic``/``length`` (from the decoder) let the few instructions unicorn
        lacks but whose effect is one flag (``clac``/``stac``, SMAP) be done here.
        """
        uc = self.uc
        self._pending = None
        self._refused = None
        if mnemonic in ("clac", "stac") and length:
            return self._set_ac(rip, length, mnemonic == "stac")
        error = None
        try:
            uc.emu_start(rip, NEVER, count=1)
        except UcError as err:
            error = err
        if self._refused is not None:
            raise StepRefused(self._refused)
        pending = self._pending
        try:
            if pending is not None:
                kind = pending[0]
                if kind == "exception":
                    _, vector, error_code, software, cr2 = pending
                    if vector == system.UD and mnemonic not in ("ud0", "ud1", "ud2"):
                        # A hypervisor's emulator injects #UD itself for opcodes the CPU lacks, so this
                        # one is valid for the guest's CPU: the interpreter lacks it (AVX, ...)
                        raise StepRefused("the interpreter does not implement this instruction (it raised #UD)")
                    system.deliver(uc, vector, error_code=error_code, software=software, cr2=cr2)
                    return f"exception {vector}"
                if kind == "syscall":
                    system.do_syscall(uc, uc.reg_read(x86.UC_X86_REG_RIP))
                else:
                    system.do_sysenter(uc, uc.reg_read(x86.UC_X86_REG_RIP))
                return None
            if error is not None:
                if error.errno == UC_ERR_INSN_INVALID:
                    if mnemonic in ("ud0", "ud1", "ud2"):
                        system.deliver(uc, system.UD)
                        return f"exception {system.UD}"
                    raise StepRefused("the interpreter does not implement this instruction")
                raise StepRefused(f"unicorn: {error}")
        except system.Fault as fault:
            system.deliver(uc, fault.vector, error_code=fault.error_code, cr2=fault.cr2)
            return f"exception {fault.vector}"
        except system.TripleFault as err:
            raise StepRefused(f"triple fault while delivering an exception ({err})") from err
        except system.Unsupported as err:
            raise StepRefused(str(err)) from err
        return None

    def system_changed(self) -> None:
        """The step changed CR0/CR3/CR4/EFER/GDTR/IDTR: reload them on the next ``load``."""
        self._system_loaded = None
