"""The x86 part of the backend interface: register state, MSRs, CPUID, events, injection.

Register state uses plain mutable dataclasses with x86 architectural names, so
that state can move between backends (KVM -> interpreter -> KVM) and into
snapshots. ``X86CpuState`` is the architectural whole a ``VcpuState`` carries.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from pyvmm.accel.core import StateError, VcpuOps, VmOps

ARCH = "x86_64"


@dataclass
class Regs:
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2


REG_NAMES = tuple(Regs.__dataclass_fields__)
GPR_NAMES = tuple(f for f in REG_NAMES if f not in ("rip", "rflags"))


# the descriptor attribute word (SDM 3.4.5), bits 40-55 of a GDT entry
ATTR_S, ATTR_DPL_SHIFT, ATTR_P = 1 << 4, 5, 1 << 7
ATTR_AVL, ATTR_L, ATTR_DB, ATTR_G = 1 << 12, 1 << 13, 1 << 14, 1 << 15


@dataclass
class Segment:
    """A segment register with its hidden (descriptor cache) part."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 3  # read/write data, accessed
    present: bool = True
    dpl: int = 0
    db: bool = False
    s: bool = True
    l: bool = False  # noqa: E741 - architectural name
    g: bool = False
    avl: bool = False
    unusable: bool = False

    def attributes(self) -> int:
        """The descriptor's attribute word (type, S, DPL, P, AVL, L, D/B, G in bits 0-15): the layout
        of VMX access rights, WHV segment attributes and, shifted left by 8, QEMU's segment flags.
        An unusable segment is not present."""
        present = self.present and not self.unusable
        return ((self.type & 0xF) | (ATTR_S if self.s else 0) | ((self.dpl & 3) << ATTR_DPL_SHIFT)
                | (ATTR_P if present else 0) | (ATTR_AVL if self.avl else 0) | (ATTR_L if self.l else 0)
                | (ATTR_DB if self.db else 0) | (ATTR_G if self.g else 0))  # fmt: skip

    @classmethod
    def from_attributes(cls, selector: int, base: int, limit: int, attributes: int, *,
                        unusable: bool | None = None) -> Segment:  # fmt: skip
        """The segment with attribute word ``attributes``; unusable when not present unless told."""
        present = bool(attributes & ATTR_P) and not unusable
        return cls(
            base=base, limit=limit, selector=selector, type=attributes & 0xF, present=present,
            dpl=(attributes >> ATTR_DPL_SHIFT) & 3, db=bool(attributes & ATTR_DB), s=bool(attributes & ATTR_S),
            l=bool(attributes & ATTR_L), g=bool(attributes & ATTR_G), avl=bool(attributes & ATTR_AVL),
            unusable=not present if unusable is None else unusable,
        )  # fmt: skip

    @classmethod
    def from_descriptor(cls, selector: int, descriptor: int) -> Segment:
        """Decode a 64-bit GDT entry into a segment cache."""
        base = ((descriptor >> 16) & 0xFFFFFF) | (((descriptor >> 56) & 0xFF) << 24)
        limit = (descriptor & 0xFFFF) | (((descriptor >> 48) & 0xF) << 16)
        attributes = (descriptor >> 40) & 0xF0FF
        if attributes & ATTR_G:
            limit = (limit << 12) | 0xFFF
        segment = cls.from_attributes(selector, base, limit, attributes, unusable=False)
        segment.present = bool(attributes & ATTR_P)
        return segment


@dataclass
class DescriptorTable:
    base: int = 0
    limit: int = 0xFFFF


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@dataclass
class SpecialRegs:
    cs: Segment = field(default_factory=lambda: Segment(base=0xFFFF0000, selector=0xF000, type=11))
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=lambda: Segment(type=11, s=False))
    ldt: Segment = field(default_factory=lambda: Segment(type=2, s=False))
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    cr0: int = 0x60000010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0xFEE00900


@dataclass
class FpuState:
    """x87/SSE state in FXSAVE terms. ``fpr`` are 8 x 16 bytes, ``xmm`` 16 x 16 bytes."""

    fcw: int = 0x37F
    fsw: int = 0
    ftwx: int = 0  # abridged tag word, as FXSAVE stores it
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    fpr: list[bytes] = field(default_factory=lambda: [bytes(16)] * 8)
    xmm: list[bytes] = field(default_factory=lambda: [bytes(16)] * 16)
    mxcsr: int = 0x1F80


@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int
    eax: int
    ebx: int
    ecx: int
    edx: int
    #: True when ``index`` (ECX on input) selects the sub-leaf
    indexed: bool = False


#: interrupt shadow kinds (``PendingEvents.shadow`` bits; KVM_X86_SHADOW_INT_* values)
SHADOW_MOV_SS = 1
SHADOW_STI = 2


@dataclass
class PendingEvents:
    """Events between instructions: an exception or interrupt being delivered, NMI state, the shadow.

    ``exception``/``interrupt`` hold a vector being injected (None when nothing is);
    ``exception_pending`` is an exception raised but not yet being delivered.
    """

    exception: int | None = None
    exception_error_code: int | None = None
    exception_pending: bool = False
    interrupt: int | None = None
    interrupt_soft: bool = False
    nmi_injected: bool = False
    nmi_pending: bool = False
    nmi_masked: bool = False
    shadow: int = 0
    #: what the saving backend keeps beyond these fields (KVM: its whole kvm_vcpu_events), so a
    #: round trip through the same backend loses nothing
    private: dict | None = field(default=None, compare=False, repr=False)

    @property
    def injecting(self) -> bool:
        return self.exception is not None or self.interrupt is not None or self.nmi_injected


@dataclass
class X86CpuState:
    """Everything architectural about one x86 vCPU, in backend-neutral form."""

    regs: Regs
    sregs: SpecialRegs
    fpu: FpuState
    xcr0: int = 1
    msrs: dict[int, int] = field(default_factory=dict)
    events: PendingEvents = field(default_factory=PendingEvents)
    #: the local APIC's 1 KiB register page (KVM_GET_LAPIC layout), when the backend has one
    lapic: bytes | None = None
    #: "runnable", "halted", "wait-for-sipi"
    mp_state: str = "runnable"


def restorable(state, backend: str, version: int) -> X86CpuState:
    """The architectural state of ``state`` if an x86 ``backend`` at state ``version`` can load it.

    Any backend's x86 state is restorable (its architectural part); a state this backend
    wrote is refused only when a newer pyvmm wrote it. Raises ``StateError``.
    """
    if state.arch != ARCH:
        raise StateError(f"cannot restore a {state.arch} vCPU state on an {ARCH} vCPU")
    if state.backend == backend and state.version > version:
        raise StateError(f"vCPU state version {state.version} is newer than this pyvmm's ({version})")
    return state.cpu


@runtime_checkable
class X86Vcpu(VcpuOps, Protocol):
    def get_regs(self) -> Regs: ...
    def set_regs(self, regs: Regs) -> None: ...
    def get_sregs(self) -> SpecialRegs: ...
    def set_sregs(self, sregs: SpecialRegs) -> None: ...
    def get_fpu(self) -> FpuState: ...
    def set_fpu(self, fpu: FpuState) -> None: ...
    def get_xcr0(self) -> int: ...
    def set_xcr0(self, value: int) -> None: ...
    def get_msrs(self, indices: list[int]) -> dict[int, int]: ...
    def set_msrs(self, msrs: dict[int, int]) -> None: ...
    def get_events(self) -> PendingEvents: ...
    def set_events(self, events: PendingEvents) -> None: ...
    def set_cpuid(self, entries: list[CpuidEntry]) -> None: ...

    # Capability.INTERRUPT_INJECTION (backends that take the userspace irqchip):
    #   interrupt_window_open() -> bool, inject_interrupt(vector), inject_nmi()


@runtime_checkable
class X86Vm(VmOps, Protocol):
    def supported_cpuid(self) -> list[CpuidEntry]:
        """What this backend can present to a guest, before the VMM's own trimming."""

    def create_vcpu(self, index: int) -> X86Vcpu: ...


#: MSRs a saved vCPU state carries (FS/GS base travel in the segment caches, EFER and
#: APIC_BASE in ``SpecialRegs``), in backend-neutral form
SAVED_MSRS = (
    0x10,  # TSC
    0x174, 0x175, 0x176,  # SYSENTER_CS/ESP/EIP
    0x1A0,  # MISC_ENABLE
    0x277,  # PAT
    0x2FF,  # MTRR_DEF_TYPE
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,  # STAR LSTAR CSTAR SYSCALL_MASK
    0xC0000102,  # KERNEL_GS_BASE
    0xC0000103,  # TSC_AUX
)  # fmt: skip


# --------------------------------------------------------------------------
# The XSAVE area's legacy region (Intel SDM vol. 1, 13.4.1) <-> FpuState

XSTATE_BV_OFFSET = 512
XSTATE_X87_SSE = 0x3
_FXSAVE_HEAD = struct.Struct("<HHBxHQQI")  # fcw fsw ftw(abridged) fop fip fdp mxcsr


def fpu_from_fxsave(area: bytes) -> FpuState:
    fcw, fsw, ftw, fop, fip, fdp, mxcsr = _FXSAVE_HEAD.unpack_from(area, 0)
    return FpuState(
        fcw=fcw, fsw=fsw, ftwx=ftw, last_opcode=fop, last_ip=fip, last_dp=fdp, mxcsr=mxcsr,
        fpr=[bytes(area[32 + 16 * i : 48 + 16 * i]) for i in range(8)],
        xmm=[bytes(area[160 + 16 * i : 176 + 16 * i]) for i in range(16)],
    )  # fmt: skip


def fpu_into_xsave(area: bytes, fpu: FpuState) -> bytes:
    """``area`` with its legacy region replaced by ``fpu`` and x87/SSE marked as not in init state."""
    out = bytearray(area)
    _FXSAVE_HEAD.pack_into(out, 0, fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode, fpu.last_ip, fpu.last_dp, fpu.mxcsr)
    for i in range(8):
        out[32 + 16 * i : 48 + 16 * i] = bytes(fpu.fpr[i]).ljust(16, b"\0")[:16]
    for i in range(16):
        out[160 + 16 * i : 176 + 16 * i] = bytes(fpu.xmm[i]).ljust(16, b"\0")[:16]
    bv = struct.unpack_from("<Q", out, XSTATE_BV_OFFSET)[0]
    struct.pack_into("<Q", out, XSTATE_BV_OFFSET, bv | XSTATE_X87_SSE)
    return bytes(out)


CPUID1_ECX_OSXSAVE = 1 << 27  # mirrors CR4.OSXSAVE (bit 18) when XSAVE (ECX bit 26) is offered


class CpuidTable:
    """Answers the guest's CPUID from a list of entries, as KVM does for the table it was given."""

    def __init__(self, entries: list[CpuidEntry]):
        self.plain: dict[int, tuple[int, int, int, int]] = {}
        self.indexed: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        for e in entries:
            regs = (e.eax, e.ebx, e.ecx, e.edx)
            if e.indexed:
                self.indexed[(e.function, e.index)] = regs
            else:
                self.plain[e.function] = regs
        self.functions = {e.function for e in entries}
        basic = self.plain.get(0) or self.indexed.get((0, 0))
        self.max_basic = basic[0] if basic else 0

    def lookup(self, leaf: int, index: int, cr4: int) -> tuple[int, int, int, int]:
        regs = self.indexed.get((leaf, index))
        if regs is None:
            regs = self.plain.get(leaf)
        if regs is None:
            if leaf in self.functions:  # an indexed leaf with an unlisted sub-leaf
                return 0, 0, 0, 0
            if leaf < 0x40000000 and leaf > self.max_basic and self.max_basic in self.plain:
                return self.plain[self.max_basic]  # Intel: out-of-range leaves return the highest basic leaf
            return 0, 0, 0, 0
        if leaf == 1:
            eax, ebx, ecx, edx = regs
            ecx = (ecx & ~CPUID1_ECX_OSXSAVE) | (CPUID1_ECX_OSXSAVE if cr4 & (1 << 18) and ecx & (1 << 26) else 0)
            return eax, ebx, ecx, edx
        return regs


# --------------------------------------------------------------------------
# Saved state <-> JSON-able data (snapshot files)

_STATE_CLASSES = {cls.__name__: cls for cls in (Regs, Segment, DescriptorTable, SpecialRegs, FpuState, CpuidEntry,
                                                PendingEvents, X86CpuState)}  # fmt: skip


def state_to_data(value):
    """A saved vCPU state (``VcpuState`` parts: dataclasses, bytes, int-keyed dicts) as JSON-able data."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if name == "VcpuState":
            return {"VcpuState": {f.name: state_to_data(getattr(value, f.name)) for f in dataclasses.fields(value)}}
        if name not in _STATE_CLASSES:
            raise TypeError(f"cannot save a {name}")
        return {name: {f.name: state_to_data(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, (bytes, bytearray)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"dict": {k: state_to_data(v) for k, v in value.items()}}
        return {"intdict": [[int(k), state_to_data(v)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [state_to_data(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot save a {type(value).__name__}")


def state_from_data(data):
    """``state_to_data``'s inverse; raises ``ValueError`` on anything it did not write."""
    from pyvmm.accel.core import VcpuState

    if isinstance(data, list):
        return [state_from_data(v) for v in data]
    if not isinstance(data, dict):
        return data
    if len(data) != 1:
        raise ValueError(f"not a saved value: keys {sorted(data)}")
    ((kind, body),) = data.items()
    if kind == "hex":
        return bytes.fromhex(body)
    if kind == "dict":
        return {k: state_from_data(v) for k, v in body.items()}
    if kind == "intdict":
        return {int(k): state_from_data(v) for k, v in body}
    cls = VcpuState if kind == "VcpuState" else _STATE_CLASSES.get(kind)
    if cls is None:
        raise ValueError(f"unknown saved type {kind!r}")
    try:
        return cls(**{k: state_from_data(v) for k, v in body.items()})
    except TypeError as err:
        raise ValueError(f"{kind}: {err}") from err
