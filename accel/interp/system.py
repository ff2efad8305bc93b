"""x86 system semantics unicorn leaves out, done by the backend between engine runs.

* exception and interrupt delivery through the guest IDT in real, protected
  and long mode: gate checks, error codes, CR2, IST and privilege-level stack
  switches via the TSS, IF/TF handling, and the nested fault -> #DF -> triple
  fault escalation;
* ``syscall`` and ``sysenter`` per their MSRs (unicorn only calls a hook);
* guest-virtual memory access through the guest's page tables (the 2.1.4
  Python binding has no ``vmem_read``), with the access checks the CPU makes
  while it pushes an exception frame.

Everything here runs while the engine is stopped: it reads the state, computes
the new state and writes it back (segment caches and CPL through the context
blob, see ``engine.py``).
"""

from __future__ import annotations

from unicorn import UcError
from unicorn import x86_const as x86

from pyvmm.accel.interp import engine
from pyvmm.arch.x86.msrs import EFER_SCE, MSR_EFER, MSR_LSTAR, MSR_STAR
from pyvmm.arch.x86.msrs import MSR_IA32_SYSENTER_CS as MSR_SYSENTER_CS
from pyvmm.arch.x86.msrs import MSR_IA32_SYSENTER_EIP as MSR_SYSENTER_EIP
from pyvmm.arch.x86.msrs import MSR_IA32_SYSENTER_ESP as MSR_SYSENTER_ESP
from pyvmm.arch.x86.msrs import MSR_SYSCALL_MASK as MSR_FMASK

# Exception vectors
DE, DB, NMI, BP, OF, BR, UD, NM, DF, TS, NP, SS_FAULT, GP, PF = 0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14
VECTORS_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})

# RFLAGS bits
TF, IF, NT, RF, VM, AC = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17, 1 << 18


FLAT_CODE64 = engine.DESC_P | engine.DESC_S | (0xB << engine.DESC_TYPE_SHIFT) | engine.DESC_L | engine.DESC_G
FLAT_CODE32 = engine.DESC_P | engine.DESC_S | (0xB << engine.DESC_TYPE_SHIFT) | engine.DESC_B | engine.DESC_G
FLAT_DATA = engine.DESC_P | engine.DESC_S | (0x3 << engine.DESC_TYPE_SHIFT) | engine.DESC_B | engine.DESC_G

_GPRS = (x86.UC_X86_REG_RIP, x86.UC_X86_REG_RSP, x86.UC_X86_REG_RFLAGS, x86.UC_X86_REG_CR0,
         x86.UC_X86_REG_CR3, x86.UC_X86_REG_CR4)  # fmt: skip


class Fault(Exception):
    """A fault raised while the backend itself accesses guest state (delivery, syscall)."""

    def __init__(self, vector: int, error_code: int = 0, cr2: int | None = None):
        super().__init__(f"vector {vector} error {error_code:#x}")
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2


class TripleFault(Exception):
    """Delivery of a double fault failed: the CPU shuts down."""


class Unsupported(Exception):
    """Guest state this backend cannot emulate (task gates, virtual-8086 mode): an internal error."""


class GuestRam:
    """Zero-copy reads of guest RAM for the backend's page walks (much cheaper than uc.mem_read).

    Writes still go through ``uc.mem_write`` so QEMU sees them (self-modifying-code tracking).
    """

    def __init__(self, regions: list[tuple[int, memoryview]] = ()):
        self.regions = [(start, start + len(view), view) for start, view in regions]

    def read(self, addr: int, size: int) -> int | None:
        for start, end, view in self.regions:
            if start <= addr and addr + size <= end:
                return int.from_bytes(view[addr - start : addr - start + size], "little")
        return None


_NO_RAM = GuestRam()


class MachineState:
    """The registers delivery needs, read once from a stopped engine (one context save)."""

    def __init__(self, uc, ram: GuestRam = _NO_RAM):
        self.uc = uc
        self.ram = ram
        self._tlb: dict[tuple[int, bool, bool], int] = {}  # (page, write, user) -> physical page
        self.rip, self.rsp, self.rflags, self.cr0, self.cr3, self.cr4 = uc.reg_read_batch(_GPRS)
        self.efer = uc.reg_read(x86.UC_X86_REG_MSR, MSR_EFER)
        self.blob = engine.Blob(uc)
        self.segs = [list(self.blob.segment(i)) for i in range(8)]
        _, self.gdt_base, self.gdt_limit, _ = uc.reg_read(x86.UC_X86_REG_GDTR)
        _, self.idt_base, self.idt_limit, _ = uc.reg_read(x86.UC_X86_REG_IDTR)
        self.hflags = self.blob.hflags

    @property
    def cpl(self) -> int:
        return self.hflags & engine.HF_CPL_MASK

    @property
    def protected(self) -> bool:
        return bool(self.cr0 & 1)

    @property
    def long_mode(self) -> bool:
        return bool(self.hflags & engine.HF_LMA)

    @property
    def code64(self) -> bool:
        return bool(self.hflags & engine.HF_CS64)

    @property
    def interrupt_shadow(self) -> bool:
        return bool(self.hflags & engine.HF_INHIBIT_IRQ)

    # ------------------------------------------------------------------
    # guest memory through the page tables

    def translate(self, linear: int, write: bool, user: bool) -> int:
        """Guest-physical address of ``linear``, raising #PF / #GP as the CPU would."""
        key = (linear >> 12, write, user)
        page = self._tlb.get(key)
        if page is None:
            page = self._walk(linear & ~0xFFF, write, user) & ~0xFFF
            self._tlb[key] = page
        return page | (linear & 0xFFF)

    def _walk(self, linear: int, write: bool, user: bool) -> int:
        cr0, cr4 = self.cr0, self.cr4
        if not cr0 & 0x80000000:
            return linear & 0xFFFFFFFF if not self.long_mode else linear
        read = self._read_phys
        wp = bool(cr0 & (1 << 16))
        entries = []  # (physical address of the entry, entry) from the top level down
        if self.long_mode:
            top = linear >> 47
            if top not in (0, 0x1FFFF):
                raise Fault(GP, 0)
            table = self.cr3 & 0x000FFFFFFFFFF000
            shifts = (39, 30, 21, 12)
        elif cr4 & 0x20:  # PAE
            pdpte_addr = (self.cr3 & 0xFFFFFFE0) + ((linear >> 30) & 3) * 8
            pdpte = read(pdpte_addr, 8)
            if not pdpte & 1:
                raise Fault(PF, (2 if write else 0) | (4 if user else 0), linear)
            table = pdpte & 0x000FFFFFFFFFF000
            shifts = (21, 12)
        else:
            table = self.cr3 & 0xFFFFF000
            shifts = (22, 12)
        size = 4 if shifts == (22, 12) else 8
        for level, shift in enumerate(shifts):
            index = (linear >> shift) & (0x3FF if size == 4 else 0x1FF)
            addr = table + index * size
            entry = read(addr, size)
            present_error = (2 if write else 0) | (4 if user else 0)
            if not entry & 1:
                raise Fault(PF, present_error, linear)
            entries.append((addr, entry))
            large = shift != 12 and entry & 0x80 and (size == 8 or cr4 & 0x10)
            if shift == 12 or large:
                break
            table = entry & (0x000FFFFFFFFFF000 if size == 8 else 0xFFFFF000)
        for _, entry in entries:
            if user and not entry & 4:
                raise Fault(PF, 1 | present_error, linear)
            if write and not entry & 2 and (user or wp):
                raise Fault(PF, 1 | present_error, linear)
        # Set accessed bits, and dirty on the leaf for writes, as the CPU does.
        for i, (addr, entry) in enumerate(entries):
            leaf = i == len(entries) - 1
            new = entry | 0x20 | (0x40 if leaf and write else 0)
            if new != entry:
                self._write_phys(addr, size, new)
        entry = entries[-1][1]
        page_bits = 12 if shift == 12 else shift
        frame_mask = (0x000FFFFFFFFFF000 if size == 8 else 0xFFFFF000) & ~((1 << page_bits) - 1)
        if size == 4 and page_bits == 22:
            # 4 MiB PSE page: bits 13..20 of the entry are physical bits 32..39
            return (entry & 0xFFC00000) | (((entry >> 13) & 0xFF) << 32) | (linear & 0x3FFFFF)
        return (entry & frame_mask) | (linear & ((1 << page_bits) - 1))

    def _read_phys(self, addr: int, size: int) -> int:
        value = self.ram.read(addr, size)
        if value is not None:
            return value
        try:
            return int.from_bytes(self.uc.mem_read(addr, size), "little")
        except UcError as err:
            raise Unsupported(f"guest page-table or descriptor access at physical {addr:#x} is not RAM") from err

    def _write_phys(self, addr: int, size: int, value: int) -> None:
        try:
            self.uc.mem_write(addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        except UcError as err:
            raise Unsupported(f"guest write at physical {addr:#x} is not RAM") from err

    def read_linear(self, linear: int, size: int, user: bool = False) -> int:
        out = 0
        pos = 0
        while pos < size:  # split only where the access crosses a page boundary
            chunk = min(size - pos, 0x1000 - ((linear + pos) & 0xFFF))
            phys = self.translate(linear + pos, False, user)
            out |= self._read_phys(phys, chunk) << (8 * pos)
            pos += chunk
        return out

    def write_linear(self, linear: int, size: int, value: int, user: bool = False) -> None:
        self.write_bytes(linear, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"), user)

    def write_bytes(self, linear: int, data: bytes, user: bool = False) -> None:
        size = len(data)
        # translate every page first: a fault must leave memory untouched, as on hardware
        first = self.translate(linear, True, user)
        if (linear & 0xFFF) + size <= 0x1000:
            try:
                self.uc.mem_write(first, data)
            except UcError as err:
                raise Unsupported(f"guest write at physical {first:#x} is not RAM") from err
            return
        for offset in range(0x1000 - (linear & 0xFFF), size, 0x1000):
            self.translate(linear + offset, True, user)
        pos = 0
        while pos < size:
            chunk = min(size - pos, 0x1000 - ((linear + pos) & 0xFFF))
            phys = self.translate(linear + pos, True, user)
            try:
                self.uc.mem_write(phys, data[pos : pos + chunk])
            except UcError as err:
                raise Unsupported(f"guest write at physical {phys:#x} is not RAM") from err
            pos += chunk

    def read_bytes(self, linear: int, size: int) -> bytes:
        """Best-effort instruction bytes for error reports."""
        try:
            return self.read_linear(linear, size).to_bytes(size, "little")
        except (Fault, Unsupported):
            return b""

    # ------------------------------------------------------------------
    # descriptors

    def descriptor(self, selector: int, error_vector: int = GP) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of the GDT/LDT entry for ``selector``."""
        index = selector & 0xFFF8
        if selector & 4:
            _, base, limit, _ = self.segs[engine.LDT]
        else:
            base, limit = self.gdt_base, self.gdt_limit
        if index + 7 > limit:
            raise Fault(error_vector, selector & 0xFFFC)
        raw = self.read_linear(base + index, 8)
        seg_base = ((raw >> 16) & 0xFFFFFF) | (((raw >> 56) & 0xFF) << 24)
        seg_limit = (raw & 0xFFFF) | (((raw >> 48) & 0xF) << 16)
        flags = (raw >> 32) & 0x00F0FF00
        if flags & engine.DESC_G:
            seg_limit = (seg_limit << 12) | 0xFFF
        return selector, seg_base, seg_limit, flags

    # ------------------------------------------------------------------
    # writing the new state back

    def commit(self, rip: int, rsp: int, rflags: int, cs=None, ss=None, cpl: int | None = None, cr2=None) -> None:
        """Load new CS/SS caches, CPL and registers; clear QEMU's stale exception record."""
        blob = self.blob
        if cs is not None:
            self.segs[engine.CS] = list(cs)
            blob.set_segment(engine.CS, *cs)
        if ss is not None:
            self.segs[engine.SS] = list(ss)
            blob.set_segment(engine.SS, *ss)
        segs = self.segs
        bases = segs[engine.DS][1] | segs[engine.ES][1] | segs[engine.SS][1]
        hflags = engine.compute_hflags(
            self.hflags, self.cr0, self.efer, segs[engine.CS][3], segs[engine.SS][3], bases != 0, bool(rflags & VM)
        )
        if cpl is not None and self.protected:
            hflags = (hflags & ~engine.HF_CPL_MASK) | cpl
        self.hflags = hflags
        blob.hflags = hflags
        blob.write("<i", engine.OLD_EXCEPTION, -1)
        blob.restore()
        uc = self.uc
        uc.reg_write(x86.UC_X86_REG_RSP, rsp)
        uc.reg_write(x86.UC_X86_REG_RFLAGS, rflags)
        uc.reg_write(x86.UC_X86_REG_RIP, rip)
        if cr2 is not None:
            uc.reg_write(x86.UC_X86_REG_CR2, cr2)
        self.rip, self.rsp, self.rflags = rip, rsp, rflags


# --------------------------------------------------------------------------
# hooks shared by the interpreter vCPU and the fallback stepper


class EngineHooks:
    """UC_HOOK_INSN handlers both engines install (the interpreter vCPU, the fallback stepper).

    ``syscall``/``sysenter`` only record what happened and stop the engine (from inside
    the hook, so the stop is exact and no other hook is skipped); the owner delivers it
    with ``do_syscall``/``do_sysenter`` once ``emu_start`` has returned. ``cpuid`` answers
    from ``self._cpuid`` (a CpuidTable; None means the engine's own model).
    """

    _pending: tuple | None
    _cpuid = None

    def _apic_enabled(self) -> bool:
        return True

    def _on_syscall(self, uc, _):
        self._pending = ("syscall",)
        uc.emu_stop()

    def _on_sysenter(self, uc, _):
        self._pending = ("sysenter",)
        uc.emu_stop()

    def _on_cpuid(self, uc, _):
        if self._cpuid is None:
            return 0  # the engine's own answer
        leaf, index, cr4 = uc.reg_read(x86.UC_X86_REG_EAX), uc.reg_read(x86.UC_X86_REG_ECX), uc.reg_read(x86.UC_X86_REG_CR4)
        eax, ebx, ecx, edx = self._cpuid.lookup(leaf, index, cr4)
        if leaf == 1 and not self._apic_enabled():
            edx &= ~(1 << 9)  # CPUID.1:EDX.APIC follows IA32_APIC_BASE's global enable (SDM vol. 3 11.4.3)
        uc.reg_write_batch(
            ((x86.UC_X86_REG_RAX, eax), (x86.UC_X86_REG_RBX, ebx), (x86.UC_X86_REG_RCX, ecx), (x86.UC_X86_REG_RDX, edx))
        )
        return 1  # skip the engine's own CPUID


# --------------------------------------------------------------------------
# exception / interrupt delivery


def exception_record(uc, vector: int) -> tuple:
    """What a UC_HOOK_INTR hook must capture: ("exception", vector, error code, software?, CR2).

    The error code and the "software interrupt" flag are only valid inside the hook.
    """
    error_code, is_int, _ = engine.Blob(uc).read("<iiQ", engine.ERROR_CODE)
    cr2 = uc.reg_read(x86.UC_X86_REG_CR2) if vector == PF else None
    return ("exception", vector, error_code & 0xFFFFFFFF, bool(is_int), cr2)


def deliver(uc, vector: int, *, error_code: int | None = None, software: bool = False,
            external: bool = False, cr2: int | None = None, ram: GuestRam = _NO_RAM) -> None:  # fmt: skip
    """Deliver ``vector`` through the guest IDT, escalating nested faults.

    ``software`` is an ``int n``/``int3``/``into`` (gate DPL checked, RIP already
    past the instruction); ``external`` a hardware interrupt or NMI. Raises
    ``TripleFault`` when even the double fault cannot be delivered. A fault while delivering a
    software interrupt is the instruction's own: it is taken with RIP back on the instruction, so
    that the handler's IRET runs it again (SDM vol. 3 6.5: faults report the faulting instruction).
    """
    first_vector = None
    while True:
        state = MachineState(uc, ram)
        try:
            _deliver_once(state, vector, error_code, software, external, cr2)
            return
        except Fault as fault:
            if vector == DF:
                raise TripleFault(f"fault {fault.vector} while delivering a double fault") from None
            if software:
                uc.reg_write(x86.UC_X86_REG_RIP, state.rip - software_interrupt_length(state, vector))
            if first_vector is None:
                first_vector = vector
            if (vector in CONTRIBUTORY and fault.vector in CONTRIBUTORY) or (
                vector == PF and (fault.vector == PF or fault.vector in CONTRIBUTORY)
            ):
                vector, error_code, cr2 = DF, 0, None
            else:
                vector, error_code, cr2 = fault.vector, fault.error_code, fault.cr2
            software, external = False, False


def software_interrupt_length(state: MachineState, vector: int) -> int:
    """The length of the ``int n`` (CD ib), ``int3`` (CC, or CD 03) or ``into`` (CE) that ends
    just before RIP."""
    if vector == 4:
        return 1
    before = state.read_linear(state.segs[engine.CS][1] + state.rip - 2, 2)
    if vector == BP and before >> 8 == 0xCC:
        return 1
    return 2


def _deliver_once(state: MachineState, vector, error_code, software, external, cr2) -> None:
    if vector in VECTORS_WITH_ERROR_CODE and not software and not external:
        code = error_code or 0
    else:
        code = None
    ext = 1 if external else 0
    if not state.protected:
        _deliver_real(state, vector)
    elif state.rflags & VM:
        raise Unsupported("interrupt delivery in virtual-8086 mode")
    elif state.long_mode:
        _deliver_long(state, vector, code, software, ext)
    else:
        _deliver_protected(state, vector, code, software, ext)
    if vector == PF and cr2 is not None:
        state.uc.reg_write(x86.UC_X86_REG_CR2, cr2)


def _deliver_real(state: MachineState, vector: int) -> None:
    if vector * 4 + 3 > state.idt_limit:
        raise Fault(GP, vector * 8 + 2)
    entry = state.read_linear(state.idt_base + vector * 4, 4)
    ip, segment = entry & 0xFFFF, entry >> 16
    ss_base = state.segs[engine.SS][1]
    sp = state.rsp & 0xFFFF
    cs_selector = state.segs[engine.CS][0]
    for value in (state.rflags & 0xFFFF, cs_selector, state.rip & 0xFFFF):
        sp = (sp - 2) & 0xFFFF
        state.write_linear(ss_base + sp, 2, value)
    rflags = state.rflags & ~(IF | TF | AC | RF)
    cs = (segment, segment << 4, 0xFFFF, state.segs[engine.CS][3] | engine.DESC_P)
    state.commit(ip, (state.rsp & ~0xFFFF) | sp, rflags, cs=cs)


def _code_segment(state: MachineState, selector: int, ext: int, long_mode: bool):
    if selector & 0xFFFC == 0:
        raise Fault(GP, ext)
    sel, base, limit, flags = state.descriptor(selector)
    dtype = (flags >> engine.DESC_TYPE_SHIFT) & 0xF
    dpl = (flags >> engine.DESC_DPL_SHIFT) & 3
    if not flags & engine.DESC_S or not dtype & 8 or dpl > state.cpl:
        raise Fault(GP, (selector & 0xFFFC) | ext)
    if long_mode and (not flags & engine.DESC_L or flags & engine.DESC_B):
        raise Fault(GP, (selector & 0xFFFC) | ext)
    if not flags & engine.DESC_P:
        raise Fault(NP, (selector & 0xFFFC) | ext)
    new_cpl = state.cpl if dtype & 4 else dpl
    return (selector & 0xFFFC) | new_cpl, base, limit, flags, new_cpl


def _gate_checks(state, vector, present, dpl, software, ext):
    if software and dpl < state.cpl:
        raise Fault(GP, vector * 8 + 2)
    if not present:
        raise Fault(NP, vector * 8 + 2 + ext)


def _deliver_long(state: MachineState, vector, code, software, ext) -> None:
    if vector * 16 + 15 > state.idt_limit:
        raise Fault(GP, vector * 8 + 2 + ext)
    base = state.idt_base + vector * 16
    low = state.read_linear(base, 8)
    high = state.read_linear(base + 8, 8)
    gate_type = (low >> 40) & 0x1F
    if gate_type not in (0xE, 0xF):
        raise Fault(GP, vector * 8 + 2 + ext)
    _gate_checks(state, vector, (low >> 47) & 1, (low >> 45) & 3, software, ext)
    target = (low & 0xFFFF) | (((low >> 48) & 0xFFFF) << 16) | ((high & 0xFFFFFFFF) << 32)
    ist = (low >> 32) & 7
    cs_sel, cs_base, cs_limit, cs_flags, new_cpl = _code_segment(state, (low >> 16) & 0xFFFF, ext, True)
    old_cpl = state.cpl
    rsp = state.rsp
    if ist or new_cpl < old_cpl:
        _, tss_base, tss_limit, _ = state.segs[engine.TR]
        offset = 0x24 + 8 * (ist - 1) if ist else 4 + 8 * new_cpl
        if offset + 7 > tss_limit:
            raise Fault(TS, state.segs[engine.TR][0] & 0xFFFC)
        rsp = state.read_linear(tss_base + offset, 8)
    rsp &= ~0xF
    old_ss = state.segs[engine.SS][0]
    frame = [old_ss, state.rsp, state.rflags, state.segs[engine.CS][0], state.rip]
    if code is not None:
        frame.append(code)
    user = new_cpl == 3
    rsp = (rsp - 8 * len(frame)) & 0xFFFFFFFFFFFFFFFF
    block = b"".join(v.to_bytes(8, "little") for v in reversed(frame))  # lowest address first
    try:
        state.write_bytes(rsp, block, user)  # one write per page touched
    except Fault as fault:
        if fault.vector == GP:  # a non-canonical stack is a stack fault
            raise Fault(SS_FAULT, ext) from None
        raise
    rflags = state.rflags & ~(TF | NT | RF | VM)
    if gate_type == 0xE:
        rflags &= ~IF
    ss = None
    if new_cpl != old_cpl:
        ss = (new_cpl, 0, 0, new_cpl << engine.DESC_DPL_SHIFT)  # a null SS with RPL = CPL, as on hardware
    state.commit(target, rsp, rflags, cs=(cs_sel, cs_base, cs_limit, cs_flags), ss=ss, cpl=new_cpl)


def _deliver_protected(state: MachineState, vector, code, software, ext) -> None:
    if vector * 8 + 7 > state.idt_limit:
        raise Fault(GP, vector * 8 + 2 + ext)
    raw = state.read_linear(state.idt_base + vector * 8, 8)
    gate_type = (raw >> 40) & 0x1F
    if gate_type == 0x5:
        raise Unsupported(f"task gate in IDT entry {vector}")
    if gate_type not in (0x6, 0x7, 0xE, 0xF):
        raise Fault(GP, vector * 8 + 2 + ext)
    _gate_checks(state, vector, (raw >> 47) & 1, (raw >> 45) & 3, software, ext)
    target = (raw & 0xFFFF) | (((raw >> 48) & 0xFFFF) << 16)
    wide = bool(gate_type & 8)
    cs_sel, cs_base, cs_limit, cs_flags, new_cpl = _code_segment(state, (raw >> 16) & 0xFFFF, ext, False)
    old_cpl = state.cpl
    ss_sel, ss_base, ss_limit, ss_flags = state.segs[engine.SS]
    esp = state.rsp & 0xFFFFFFFF
    frame = []
    new_ss = None
    if new_cpl < old_cpl:
        tr_sel, tss_base, tss_limit, tr_flags = state.segs[engine.TR]
        if ((tr_flags >> engine.DESC_TYPE_SHIFT) & 0xF) in (9, 11):
            offset = 4 + 8 * new_cpl
            if offset + 5 > tss_limit:
                raise Fault(TS, tr_sel & 0xFFFC)
            esp = state.read_linear(tss_base + offset, 4)
            stack_sel = state.read_linear(tss_base + offset + 4, 2)
        else:
            offset = 2 + 4 * new_cpl
            esp = state.read_linear(tss_base + offset, 2)
            stack_sel = state.read_linear(tss_base + offset + 2, 2)
        if stack_sel & 0xFFFC == 0:
            raise Fault(TS, ext)
        new_ss = state.descriptor(stack_sel, TS)
        stype = (new_ss[3] >> engine.DESC_TYPE_SHIFT) & 0xF
        if (stack_sel & 3) != new_cpl or (new_ss[3] >> engine.DESC_DPL_SHIFT) & 3 != new_cpl or stype & 0xA != 2:
            raise Fault(TS, stack_sel & 0xFFFC)
        if not new_ss[3] & engine.DESC_P:
            raise Fault(SS_FAULT, stack_sel & 0xFFFC)
        frame += [ss_sel, state.rsp & 0xFFFFFFFF]
        ss_sel, ss_base, ss_limit, ss_flags = new_ss
    frame += [state.rflags & 0xFFFFFFFF, state.segs[engine.CS][0], state.rip & 0xFFFFFFFF]
    if code is not None:
        frame.append(code)
    size = 4 if wide else 2
    mask = 0xFFFFFFFF if ss_flags & engine.DESC_B else 0xFFFF
    user = new_cpl == 3
    for value in frame:
        esp = (esp - size) & mask
        state.write_linear(ss_base + esp, size, value, user)
    rflags = state.rflags & ~(TF | NT | RF | VM)
    if gate_type in (0x6, 0xE):
        rflags &= ~IF
    new_esp = (state.rsp & ~mask) | esp if new_ss is None else esp
    state.commit(target, new_esp, rflags, cs=(cs_sel, cs_base, cs_limit, cs_flags), ss=new_ss, cpl=new_cpl)


# --------------------------------------------------------------------------
# fast system calls


def do_syscall(uc, next_rip: int) -> None:
    """``syscall`` (64-bit mode): unicorn only called the hook and skipped the instruction."""
    state = MachineState(uc)  # touches no guest memory
    if not state.efer & EFER_SCE or not state.code64:
        state.rip = next_rip - 2
        state.uc.reg_write(x86.UC_X86_REG_RIP, next_rip - 2)
        raise Fault(UD)
    user_rflags = state.rflags
    star = uc.reg_read(x86.UC_X86_REG_MSR, MSR_STAR)
    lstar = uc.reg_read(x86.UC_X86_REG_MSR, MSR_LSTAR)
    fmask = uc.reg_read(x86.UC_X86_REG_MSR, MSR_FMASK)
    selector = (star >> 32) & 0xFFFC
    cs = (selector, 0, 0xFFFFFFFF, FLAT_CODE64)
    ss = ((selector + 8) & 0xFFFF, 0, 0xFFFFFFFF, FLAT_DATA)
    state.commit(lstar, state.rsp, (state.rflags & ~fmask & ~RF) | 2, cs=cs, ss=ss, cpl=0)
    # after commit: it restores the context saved before this call
    uc.reg_write(x86.UC_X86_REG_RCX, next_rip)
    uc.reg_write(x86.UC_X86_REG_R11, user_rflags & ~RF)


def do_sysenter(uc, next_rip: int) -> None:
    """``sysenter``: flat ring-0 CS/SS from SYSENTER_CS, RIP/RSP from the MSRs."""
    state = MachineState(uc)
    selector = uc.reg_read(x86.UC_X86_REG_MSR, MSR_SYSENTER_CS) & 0xFFFC
    if not state.protected or selector == 0:
        state.uc.reg_write(x86.UC_X86_REG_RIP, next_rip - 2)
        raise Fault(GP if state.protected else UD, 0)
    eip = uc.reg_read(x86.UC_X86_REG_MSR, MSR_SYSENTER_EIP)
    esp = uc.reg_read(x86.UC_X86_REG_MSR, MSR_SYSENTER_ESP)
    if not state.long_mode:
        eip &= 0xFFFFFFFF
        esp &= 0xFFFFFFFF
    cs = (selector, 0, 0xFFFFFFFF, FLAT_CODE64 if state.long_mode else FLAT_CODE32)
    ss = ((selector + 8) & 0xFFFF, 0, 0xFFFFFFFF, FLAT_DATA)
    state.commit(eip, esp, state.rflags & ~(VM | IF | RF), cs=cs, ss=ss, cpl=0)
