"""The fallback manager: an instruction the hypervisor's emulator cannot execute is stepped in software.

On a PVM host KVM emulates all guest kernel-mode code, and its emulator does
not know some instructions Linux uses (``cmpxchg16b``, ``xrstor``, ``int3``,
``popcnt`` ...): KVM_RUN then returns an emulation failure (``EmulationFailure``).
``FallbackManager`` is the run loop's ``fallback`` callback for such exits. It

1. reads the vCPU's state through the x86 interface (registers, segment caches,
   control registers, pending events; and the FPU/SSE/XSAVE state, XCR0 and the
   MSRs unless the instruction is one of the few known to touch none of them),
2. loads it into the vCPU's ``Stepper`` (accel/stepper.py),
3. executes exactly that one instruction, delivering an exception it raises
   through the guest IDT (``int3`` resumes at the #BP handler's first
   instruction, a #PF at the #PF handler's),
4. writes back only what the instruction changed.

Cost per fallback, measured here (PVM host, Python 3.11, one idle core): ~220 us
for an instruction that touches only GPRs/flags/memory (popcnt, cmpxchg16b, int3,
clac): get_regs/get_sregs/get_events ~70 us, loading the engine ~70 us, two state
snapshots ~30 us, the step ~18 us, set_regs ~15 us; ~520 us for an SSE
instruction (the FPU/SSE registers move both ways through unicorn's register
API). ``summary()`` reports the measured mean per instruction.

unicorn and capstone are imported at the first fallback, not before.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import astuple, dataclass, replace

from pyvmm.accel.core import Capability, EmulationFailure
from pyvmm.accel.x86 import SHADOW_MOV_SS, SHADOW_STI, CpuidEntry, SpecialRegs, fpu_from_fxsave, fpu_into_xsave
from pyvmm.arch.x86.insn import rep_count_mask
from pyvmm.arch.x86.msrs import MSR_IA32_TSC as MSR_TSC
from pyvmm.errors import AccelError, GuestError

log = logging.getLogger("pyvmm.fallback")

#: Instructions whose effects are limited to GPRs, RFLAGS, RIP, memory and (through an
#: exception they raise) the segment/stack state: their steps skip the FPU, XCR0 and MSRs.
INTEGER_ONLY = frozenset(
    """popcnt lzcnt tzcnt cmpxchg16b cmpxchg8b cmpxchg xadd xchg int3 int1 int into movbe bsf bsr
    bt bts btr btc add sub adc sbb and or xor not neg inc dec mov movzx movsx movsxd cmp test
    andn bextr blsi blsmsk blsr bzhi pdep pext rorx sarx shlx shrx adcx adox crc32 clac stac""".split()
)
#: Instructions that read or write the transferred MSRs (explicitly, or as syscall/swapgs/rdtsc
#: do): only their steps move the MSRs (an SSE instruction's step does not).
MSR_USERS = frozenset("rdmsr wrmsr syscall sysret sysretq sysenter sysexit swapgs rdtsc rdtscp rdpid".split())
#: mnemonics that load or store the extended state as a whole
XSAVE_FAMILY = frozenset(
    "xsave xsave64 xsaveopt xsaveopt64 xsavec xsavec64 xsaves xsaves64 xrstor xrstor64 xrstors xrstors64".split()
)
IRET = frozenset(("iret", "iretd", "iretq"))
INTERP_XSTATE = 0x3  # the x87/SSE components the interpreter's XSAVE family covers


@dataclass
class InsnStats:
    text: str  # mnemonic and operands (capstone), or "(undecodable)"
    mnemonic: str
    count: int = 0
    seconds: float = 0.0


class FallbackManager:
    """The ``VcpuLoop`` fallback: ``manager(vcpu, exit)`` steps the failing instruction in the interpreter.

    ``memory``/``pio``/``mmio`` are the VMM's guest memory and buses (the stepper
    forwards the instruction's I/O to them); ``capabilities`` are the VM's
    (``XSAVE_STATE``: the vCPUs give their whole XSAVE area; ``IN_KERNEL_IRQCHIP``:
    the stepper must leave the interrupt controllers to the hypervisor).
    ``set_cpuid(index, entries)`` gives a vCPU's CPUID table for a stepped CPUID.
    Counts are kept per instruction bytes (``counts()``, ``summary()``); each
    instruction is logged at INFO the first time it is seen.
    """

    def __init__(self, memory, pio, mmio, capabilities=frozenset({Capability.IN_KERNEL_IRQCHIP}), *,
                 hypervisor: str = "KVM", why: str = "cannot emulate"):  # fmt: skip
        self.memory, self.pio, self.mmio = memory, pio, mmio
        self.hypervisor = hypervisor
        self.why = why  # "<hypervisor> <why> <instruction>" in the first-time log line
        self.capabilities = frozenset(capabilities)
        self._steppers: dict[int, object] = {}
        self._cpuid: dict[int, list[CpuidEntry]] = {}
        self._stats: dict[bytes, InsnStats] = {}
        self._decoded: dict[tuple[bytes, int], tuple[bytes, str, str]] = {}
        self._lock = threading.Lock()
        self._msr_list: dict[int, tuple[int, ...]] = {}
        self._disasm = {}
        self.total = 0
        self.seconds = 0.0

    def set_cpuid(self, index: int, entries: list[CpuidEntry]) -> None:
        self._cpuid[index] = list(entries)

    def stepper(self, index: int):
        stepper = self._steppers.get(index)
        if stepper is None:
            from pyvmm.accel.stepper import Stepper  # the first fallback pays for unicorn

            kernel_irqchip = Capability.IN_KERNEL_IRQCHIP in self.capabilities
            stepper = self._steppers[index] = Stepper(index, self.memory, self.pio, self.mmio,
                                                      self._cpuid.get(index, []), kernel_irqchip=kernel_irqchip)
        return stepper

    # ------------------------------------------------------------ decoding
    def _decode(self, window: bytes, bits: int) -> tuple[bytes, str, str]:
        """(instruction bytes, mnemonic, text) of the first instruction in ``window``."""
        key = (window, bits)
        hit = self._decoded.get(key)
        if hit is None:
            import capstone

            cs = self._disasm.get(bits)
            if cs is None:
                mode = {64: capstone.CS_MODE_64, 32: capstone.CS_MODE_32, 16: capstone.CS_MODE_16}[bits]
                cs = self._disasm[bits] = capstone.Cs(capstone.CS_ARCH_X86, mode)
            insn = next(cs.disasm(window, 0, 1), None)
            if insn is None:
                hit = (window, "", "(undecodable)")
            else:
                text = f"{insn.mnemonic} {insn.op_str}".strip()
                hit = (bytes(window[: insn.size]), insn.mnemonic.split()[-1], text)
            if len(self._decoded) > 4096:
                self._decoded.clear()
            self._decoded[key] = hit
        return hit

    @staticmethod
    def _code_bits(sregs: SpecialRegs) -> int:
        if sregs.efer & 0x400 and sregs.cs.l:
            return 64
        return 32 if sregs.cs.db and sregs.cr0 & 1 else 16

    # ------------------------------------------------------------ state transfer
    def _msrs_of(self, vcpu) -> tuple[int, ...]:
        """The transferable MSRs this vCPU can read (found once per vCPU)."""
        from pyvmm.accel.stepper import TRANSFER_MSRS

        listed = self._msr_list.get(vcpu.index)
        if listed is None:
            readable = []
            for msr in (MSR_TSC, *TRANSFER_MSRS):
                try:
                    vcpu.get_msrs([msr])
                    readable.append(msr)
                except AccelError:
                    pass
            listed = self._msr_list[vcpu.index] = tuple(readable)
        return listed

    def read_state(self, vcpu, full: bool, sregs: SpecialRegs | None = None, msrs: bool = False):
        from pyvmm.accel.stepper import MovedState

        state = MovedState(vcpu.get_regs(), sregs or vcpu.get_sregs(), vcpu.get_events(), full)
        if full:
            if Capability.XSAVE_STATE in self.capabilities:
                state.xsave = vcpu.get_xsave()
                state.fpu = fpu_from_fxsave(state.xsave)
            else:
                state.fpu = vcpu.get_fpu()
            state.xcr0 = vcpu.get_xcr0()
            if msrs:
                state.msrs = vcpu.get_msrs(list(self._msrs_of(vcpu)))
        return state

    def write_back(self, vcpu, state, before: dict, after: dict, mnemonic: str, events_changed: bool) -> None:
        """Give the vCPU what the step changed."""
        from pyvmm.accel.stepper import Stepper

        vcpu.set_regs(Stepper.regs_of(after))
        sregs = state.sregs
        changed_sregs = False
        for i, name in enumerate(("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr")):
            if after["segments"][i] != before["segments"][i]:
                setattr(sregs, name, Stepper.segment_of(after, i))
                changed_sregs = True
        if after["crs"] != before["crs"]:
            sregs.cr0, _, sregs.cr2, sregs.cr3, sregs.cr4 = after["crs"]
            changed_sregs = True
        if after["gdt"] != before["gdt"]:
            sregs.gdt.base, sregs.gdt.limit = after["gdt"]
            changed_sregs = True
        if after["idt"] != before["idt"]:
            sregs.idt.base, sregs.idt.limit = after["idt"]
            changed_sregs = True
        if after["efer"] != before["efer"]:
            sregs.efer = after["efer"]
            changed_sregs = True
        if changed_sregs:
            vcpu.set_sregs(sregs)
        if state.full:
            if after["xcr0"] != before["xcr0"]:
                vcpu.set_xcr0(after["xcr0"])
            if after["fpu"] != before["fpu"]:
                if state.xsave is not None:
                    vcpu.set_xsave(fpu_into_xsave(state.xsave, after["fpu"]))
                else:
                    vcpu.set_fpu(after["fpu"])
        if state.msrs:
            changed = {m: v for m, v in after["msrs"].items() if m in state.msrs and v != before["msrs"].get(m)}
            if changed:
                vcpu.set_msrs(changed)
        events = state.events
        new_shadow = 0
        if after["shadow"]:
            new_shadow = SHADOW_STI if mnemonic == "sti" else SHADOW_MOV_SS
        if mnemonic in IRET and events.nmi_masked:
            events.nmi_masked = False  # IRET ends NMI blocking
            events_changed = True
        if new_shadow != events.shadow or events_changed:
            events.shadow = new_shadow
            vcpu.set_events(events)

    def _past_a_finished_rep(self, state, insn: bytes, sregs: SpecialRegs, after: dict) -> dict:
        """unicorn steps a REP string instruction one iteration at a time and, after the last one, stops
        on the instruction with the count at zero; the CPU moves past it (SDM vol. 2, REP): so does the
        state given back."""
        from pyvmm.accel.stepper import Stepper

        mask = rep_count_mask(insn, code_bits=self._code_bits(sregs))
        regs = Stepper.regs_of(after)
        if mask is None or regs.rip != state.regs.rip or regs.rcx & mask:
            return after
        return {**after, "gprs": astuple(replace(regs, rip=regs.rip + len(insn)))}

    # ------------------------------------------------------------ the callback
    def __call__(self, vcpu, failure: EmulationFailure) -> None:
        from pyvmm.accel.stepper import MovedState, StepRefused

        start = time.perf_counter()
        index = vcpu.index
        stepper = self.stepper(index)
        window = failure.insn
        sregs = vcpu.get_sregs()
        if not window:  # no instruction bytes from the hypervisor: read them through the page tables
            window = stepper.instruction_bytes(MovedState(vcpu.get_regs(), sregs, None, False))
        with self._lock:  # the decoder and its cache are shared by the vCPU threads
            insn, mnemonic, text = self._decode(window, self._code_bits(sregs))
        full = mnemonic not in INTEGER_ONLY
        msrs = mnemonic in MSR_USERS
        state = self.read_state(vcpu, full, sregs, msrs)
        if full and mnemonic in XSAVE_FAMILY and state.xcr0 & ~INTERP_XSTATE:
            self._fail(vcpu, state, insn, text,
                       f"XCR0 is {state.xcr0:#x}: the interpreter's {mnemonic} covers only x87/SSE state (0x3); "
                       "the guest was offered XSAVE features the interpreter lacks")  # fmt: skip
        if mnemonic.startswith("v") and mnemonic not in ("verr", "verw"):
            # unicorn 2.1.4 decodes some VEX forms as their legacy SSE twins (vpxor xmm0, xmm1, xmm2
            # runs as pxor xmm0, xmm2): never step them, the result would be silently wrong
            self._fail(vcpu, state, insn, text, "the interpreter does not implement AVX (VEX/EVEX) instructions")
        stepper.load(state)
        before = stepper.snapshot(full, msrs)
        events = state.events
        events_changed = False
        try:
            if events.injecting:
                # the hypervisor was delivering an event before the instruction: deliver it, run nothing else
                delivered = stepper.deliver_event(events)
                if events.nmi_injected:
                    events.nmi_masked = True
                events.exception = events.exception_error_code = None
                events.exception_pending = False
                events.interrupt = None
                events.nmi_injected = False
                events_changed = True
            else:
                delivered = stepper.step(state.regs.rip, mnemonic, len(insn))
        except StepRefused as err:
            self._fail(vcpu, state, insn, text, str(err))
        after = stepper.snapshot(full, msrs)
        if delivered is None and not events_changed:
            after = self._past_a_finished_rep(state, insn, sregs, after)
        if (after["crs"], after["gdt"], after["idt"], after["efer"]) != (before["crs"], before["gdt"], before["idt"],
                                                                           before["efer"]):  # fmt: skip
            stepper.system_changed()
        if delivered is None and after["gprs"] == before["gprs"] and after["segments"] == before["segments"]:
            self._fail(vcpu, state, insn, text, "the interpreter executed nothing (the step made no progress)")
        self.write_back(vcpu, state, before, after, mnemonic, events_changed)
        elapsed = time.perf_counter() - start
        with self._lock:
            stats = self._stats.get(insn)
            first = stats is None
            if first:
                stats = self._stats[insn] = InsnStats(text, mnemonic)
            stats.count += 1
            stats.seconds += elapsed
            self.total += 1
            self.seconds += elapsed
        if first:
            log.info(
                "fallback: vcpu %d at rip %#x: %s %s %s (%s); stepped in the interpreter%s",
                index, state.regs.rip, self.hypervisor, self.why, text, insn.hex(" "), f", {delivered} delivered" if delivered else "",
            )

    def _fail(self, vcpu, state, insn: bytes, text: str, why: str):
        raise GuestError(
            f"the interpreter fallback cannot execute {text} (bytes: {insn.hex(' ')}): {why}",
            rip=state.regs.rip,
            vcpu=vcpu.index,
        )

    # ------------------------------------------------------------ reporting
    def counts(self) -> dict[str, int]:
        """``"<mnemonic and operands> (<bytes>)" -> count``, most frequent first."""
        with self._lock:
            items = sorted(self._stats.items(), key=lambda kv: -kv[1].count)
            return {f"{s.text} ({insn.hex(' ')})": s.count for insn, s in items}

    def summary(self) -> list[str]:
        """Lines for the exit report: total, mean cost per fallback, and each instruction."""
        with self._lock:
            if not self.total:
                return []
            lines = [f"interpreter fallbacks: {self.total} in {self.seconds:.3f} s "
                     f"({self.seconds / self.total * 1e6:.0f} us each)"]  # fmt: skip
            for insn, s in sorted(self._stats.items(), key=lambda kv: -kv[1].count):
                lines.append(f"  {s.count:8d} x {s.text} ({insn.hex(' ')}), {s.seconds / s.count * 1e6:.0f} us each")
            return lines

    def close(self) -> None:
        for stepper in self._steppers.values():
            stepper.close()
        self._steppers.clear()
