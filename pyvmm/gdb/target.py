"""The x86-64 register file as gdb sees it: the target description and the ``g`` packet codec.

gdb learns the registers from the XML target description it reads with
``qXfer:features:read:target.xml`` (gdb manual, "Target Descriptions" and "i386 Features"):
``target.xml`` names the architecture (i386:x86-64) and includes one file per feature:

- ``org.gnu.gdb.i386.core``: rax..r15, rip, eflags, the six selectors, st0-st7 and the x87
  control registers (fctrl fstat ftag fiseg fioff foseg fooff fop);
- ``org.gnu.gdb.i386.sse``: xmm0-xmm15, mxcsr;
- ``org.gnu.gdb.i386.segments``: fs_base, gs_base, and k_gs_base (the swapgs MSR, as QEMU shows it);
- ``org.gnu.gdb.i386.sys``: cr0, cr2, cr3, cr4, cr8, efer (a feature gdb does not know by name; it
  shows the registers as they are described, as with QEMU's).

Register numbers are the order of ``REGISTERS``; the ``g``/``G`` packets carry every register in
that order, each little-endian in its own size, and ``p``/``P`` address one by number. The values
come from pyvmm's ``Regs``, ``SpecialRegs`` and ``FpuState`` (``VcpuRegisters``): selectors and the
FS/GS bases from the segment caches, st0-st7 as the first 10 bytes of each FXSAVE slot (slots are in
ST(i) order), ftag as the full two-bit-per-register tag word computed from FXSAVE's abridged one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvmm.accel.x86 import FpuState, Regs, SpecialRegs
from pyvmm.gdb.errors import GdbError


@dataclass
class VcpuRegisters:
    """Everything the gdb register file shows of one vCPU."""

    regs: Regs = field(default_factory=Regs)
    sregs: SpecialRegs = field(default_factory=SpecialRegs)
    fpu: FpuState = field(default_factory=FpuState)
    #: MSR 0xC0000102, the GS base swapgs exchanges (k_gs_base)
    kernel_gs_base: int = 0


@dataclass(frozen=True)
class Register:
    name: str
    bitsize: int
    type: str
    group: str | None
    feature: str
    read: Callable[[VcpuRegisters], int]
    write: Callable[[VcpuRegisters, int], None]

    @property
    def size(self) -> int:
        return self.bitsize // 8


# --------------------------------------------------------------------------
# Accessors

def _gpr(name: str):
    def read(cpu: VcpuRegisters) -> int:
        return getattr(cpu.regs, name)

    def write(cpu: VcpuRegisters, value: int) -> None:
        setattr(cpu.regs, name, value)

    return read, write


def _selector(name: str):
    def read(cpu: VcpuRegisters) -> int:
        return getattr(cpu.sregs, name).selector

    def write(cpu: VcpuRegisters, value: int) -> None:
        # only the visible part: loading a descriptor is the guest's business
        getattr(cpu.sregs, name).selector = value & 0xFFFF

    return read, write


def _segment_base(name: str):
    def read(cpu: VcpuRegisters) -> int:
        return getattr(cpu.sregs, name).base

    def write(cpu: VcpuRegisters, value: int) -> None:
        getattr(cpu.sregs, name).base = value

    return read, write


def _sreg(name: str):
    def read(cpu: VcpuRegisters) -> int:
        return getattr(cpu.sregs, name)

    def write(cpu: VcpuRegisters, value: int) -> None:
        setattr(cpu.sregs, name, value)

    return read, write


def _fpu_field(name: str, mask: int):
    def read(cpu: VcpuRegisters) -> int:
        return getattr(cpu.fpu, name) & mask

    def write(cpu: VcpuRegisters, value: int) -> None:
        setattr(cpu.fpu, name, value & mask)

    return read, write


def _st(index: int):
    def read(cpu: VcpuRegisters) -> int:
        return int.from_bytes(bytes(cpu.fpu.fpr[index])[:10].ljust(10, b"\0"), "little")

    def write(cpu: VcpuRegisters, value: int) -> None:
        fpr = list(cpu.fpu.fpr)
        # FXSAVE's slot is 16 bytes; the 6 above the 80-bit value are reserved and kept as they were
        fpr[index] = value.to_bytes(10, "little") + bytes(fpr[index]).ljust(16, b"\0")[10:16]
        cpu.fpu.fpr = fpr

    return read, write


def _xmm(index: int):
    def read(cpu: VcpuRegisters) -> int:
        return int.from_bytes(bytes(cpu.fpu.xmm[index]).ljust(16, b"\0")[:16], "little")

    def write(cpu: VcpuRegisters, value: int) -> None:
        xmm = list(cpu.fpu.xmm)
        xmm[index] = value.to_bytes(16, "little")
        cpu.fpu.xmm = xmm

    return read, write


TAG_VALID, TAG_ZERO, TAG_SPECIAL, TAG_EMPTY = range(4)


def x87_tag(value: bytes) -> int:
    """The full tag of a non-empty x87 register holding the 80-bit ``value`` (SDM vol. 1, 8.1.7)."""
    mantissa = int.from_bytes(value[:8], "little")
    exponent = int.from_bytes(value[8:10], "little") & 0x7FFF
    if exponent == 0x7FFF:
        return TAG_SPECIAL  # infinity, NaN
    if exponent == 0:
        return TAG_ZERO if mantissa == 0 else TAG_SPECIAL  # zero; denormal
    return TAG_VALID if mantissa >> 63 else TAG_SPECIAL  # normal; unnormal


def full_tag_word(fpu: FpuState) -> int:
    """FXSAVE's abridged tag (one bit per physical register: not empty) as the 16-bit tag word.

    Tag bits are by physical register R0-R7, the FXSAVE slots by stack position ST(i) = R((TOP+i) mod 8).
    """
    top = (fpu.fsw >> 11) & 7
    word = 0
    for physical in range(8):
        if fpu.ftwx & (1 << physical):
            tag = x87_tag(bytes(fpu.fpr[(physical - top) & 7])[:10].ljust(10, b"\0"))
        else:
            tag = TAG_EMPTY
        word |= tag << (2 * physical)
    return word


def _ftag():
    def read(cpu: VcpuRegisters) -> int:
        return full_tag_word(cpu.fpu)

    def write(cpu: VcpuRegisters, value: int) -> None:
        cpu.fpu.ftwx = sum(1 << i for i in range(8) if (value >> (2 * i)) & 3 != TAG_EMPTY)

    return read, write


def _x87_pointer(name: str, part: str):
    """fioff/fiseg (fooff/foseg) are bits 0-31 and 32-47 of FXSAVE64's 64-bit FPU IP (DP), as gdb
    reads them from the FXSAVE image; a write keeps bits 48-63."""

    def read(cpu: VcpuRegisters) -> int:
        pointer = getattr(cpu.fpu, name)
        return pointer & 0xFFFFFFFF if part == "offset" else (pointer >> 32) & 0xFFFF

    def write(cpu: VcpuRegisters, value: int) -> None:
        pointer = getattr(cpu.fpu, name)
        if part == "offset":
            pointer = (pointer & ~0xFFFFFFFF) | (value & 0xFFFFFFFF)
        else:
            pointer = (pointer & ~(0xFFFF << 32)) | ((value & 0xFFFF) << 32)
        setattr(cpu.fpu, name, pointer)

    return read, write


def _kernel_gs_base():
    def read(cpu: VcpuRegisters) -> int:
        return cpu.kernel_gs_base

    def write(cpu: VcpuRegisters, value: int) -> None:
        cpu.kernel_gs_base = value

    return read, write


def _rflags():
    def read(cpu: VcpuRegisters) -> int:
        return cpu.regs.rflags & 0xFFFFFFFF

    def write(cpu: VcpuRegisters, value: int) -> None:
        cpu.regs.rflags = value  # bits 32-63 of RFLAGS are reserved (zero)

    return read, write


# --------------------------------------------------------------------------
# The register file, in gdb's order

CORE = "org.gnu.gdb.i386.core"
SSE = "org.gnu.gdb.i386.sse"
SEGMENTS = "org.gnu.gdb.i386.segments"
SYS = "org.gnu.gdb.i386.sys"


def _build_registers() -> tuple[Register, ...]:
    regs: list[Register] = []

    def add(name, bitsize, type_, feature, accessors, group=None):
        regs.append(Register(name, bitsize, type_, group, feature, *accessors))

    # gdb's amd64 order: rbp before rsp
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp") + tuple(f"r{i}" for i in range(8, 16)):
        add(name, 64, "data_ptr" if name in ("rbp", "rsp") else "int64", CORE, _gpr(name))
    add("rip", 64, "code_ptr", CORE, _gpr("rip"))
    add("eflags", 32, "x86_eflags", CORE, _rflags())
    for name in ("cs", "ss", "ds", "es", "fs", "gs"):
        add(name, 32, "int32", CORE, _selector(name))
    for i in range(8):
        add(f"st{i}", 80, "i387_ext", CORE, _st(i))
    add("fctrl", 32, "int", CORE, _fpu_field("fcw", 0xFFFF), "float")
    add("fstat", 32, "int", CORE, _fpu_field("fsw", 0xFFFF), "float")
    add("ftag", 32, "int", CORE, _ftag(), "float")
    add("fiseg", 32, "int", CORE, _x87_pointer("last_ip", "segment"), "float")
    add("fioff", 32, "int", CORE, _x87_pointer("last_ip", "offset"), "float")
    add("foseg", 32, "int", CORE, _x87_pointer("last_dp", "segment"), "float")
    add("fooff", 32, "int", CORE, _x87_pointer("last_dp", "offset"), "float")
    add("fop", 32, "int", CORE, _fpu_field("last_opcode", 0x7FF), "float")
    for i in range(16):
        add(f"xmm{i}", 128, "vec128", SSE, _xmm(i), "vector")
    add("mxcsr", 32, "x86_mxcsr", SSE, _fpu_field("mxcsr", 0xFFFFFFFF), "vector")
    add("fs_base", 64, "int", SEGMENTS, _segment_base("fs"))
    add("gs_base", 64, "int", SEGMENTS, _segment_base("gs"))
    add("k_gs_base", 64, "int", SEGMENTS, _kernel_gs_base())
    add("cr0", 64, "x86_cr0", SYS, _sreg("cr0"), "system")
    add("cr2", 64, "int", SYS, _sreg("cr2"), "system")
    add("cr3", 64, "int", SYS, _sreg("cr3"), "system")
    add("cr4", 64, "x86_cr4", SYS, _sreg("cr4"), "system")
    add("cr8", 64, "int", SYS, _sreg("cr8"), "system")
    add("efer", 64, "x86_efer", SYS, _sreg("efer"), "system")
    return tuple(regs)


REGISTERS = _build_registers()
REGISTER_NUMBERS = {reg.name: number for number, reg in enumerate(REGISTERS)}
#: bytes in a ``g`` packet's register image (twice that in hex digits)
REGISTER_FILE_SIZE = sum(reg.size for reg in REGISTERS)


def register_number(name: str) -> int:
    try:
        return REGISTER_NUMBERS[name]
    except KeyError:
        raise GdbError(f"no register named {name!r} in the x86-64 register file") from None


def _lookup(number: int) -> Register:
    if not 0 <= number < len(REGISTERS):
        raise GdbError(f"no register number {number} (the x86-64 register file has {len(REGISTERS)})")
    return REGISTERS[number]


def encode_register(cpu: VcpuRegisters, number: int) -> bytes:
    reg = _lookup(number)
    return (reg.read(cpu) & ((1 << reg.bitsize) - 1)).to_bytes(reg.size, "little")


def decode_register(cpu: VcpuRegisters, number: int, data: bytes) -> VcpuRegisters:
    """A copy of ``cpu`` with register ``number`` set from its little-endian image ``data``."""
    reg = _lookup(number)
    if len(data) != reg.size:
        raise GdbError(f"register {reg.name} is {reg.size} bytes, got {len(data)}")
    out = copy.deepcopy(cpu)
    reg.write(out, int.from_bytes(data, "little"))
    return out


def encode_registers(cpu: VcpuRegisters) -> bytes:
    """The ``g`` packet's register image (binary; the packet carries it in hex)."""
    return b"".join(encode_register(cpu, number) for number in range(len(REGISTERS)))


def decode_registers(cpu: VcpuRegisters, data: bytes) -> VcpuRegisters:
    """A copy of ``cpu`` with every register set from the ``G`` packet's image ``data``."""
    if len(data) != REGISTER_FILE_SIZE:
        raise GdbError(f"a register image is {REGISTER_FILE_SIZE} bytes, got {len(data)}")
    out = copy.deepcopy(cpu)
    offset = 0
    for reg in REGISTERS:
        reg.write(out, int.from_bytes(data[offset : offset + reg.size], "little"))
        offset += reg.size
    return out


# --------------------------------------------------------------------------
# The target description

XI_NAMESPACE = "http://www.w3.org/2001/XInclude"

_FEATURE_FILES = {
    CORE: "pyvmm-x86_64-core.xml",
    SSE: "pyvmm-x86_64-sse.xml",
    SEGMENTS: "pyvmm-x86_64-segments.xml",
    SYS: "pyvmm-x86_64-sys.xml",
}


def _flags(type_id: str, size: int, fields: list[tuple[str, int, int]]) -> str:
    lines = [f'  <flags id="{type_id}" size="{size}">']
    lines += [f'    <field name="{name}" start="{start}" end="{end}"/>' for name, start, end in fields]
    return "\n".join(lines + ["  </flags>"])


def _bits(*names_and_bits) -> list[tuple[str, int, int]]:
    return [(name, bit, bit) for name, bit in names_and_bits]


# the architectural bit names (SDM vol. 1 3.4.3, 10.2.3; vol. 3 2.5, 2.2.1)
_EFLAGS = _bits(("CF", 0), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9), ("DF", 10),
                ("OF", 11)) + [("IOPL", 12, 13)] + _bits(("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18),
                                                         ("VIF", 19), ("VIP", 20), ("ID", 21))  # fmt: skip
_MXCSR = _bits(("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6), ("IM", 7),
               ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15)) + [("RC", 13, 14)]  # fmt: skip
_CR0 = _bits(("PE", 0), ("MP", 1), ("EM", 2), ("TS", 3), ("ET", 4), ("NE", 5), ("WP", 16), ("AM", 18),
             ("NW", 29), ("CD", 30), ("PG", 31))  # fmt: skip
_CR4 = _bits(("VME", 0), ("PVI", 1), ("TSD", 2), ("DE", 3), ("PSE", 4), ("PAE", 5), ("MCE", 6), ("PGE", 7),
             ("PCE", 8), ("OSFXSR", 9), ("OSXMMEXCPT", 10), ("UMIP", 11), ("LA57", 12), ("VMXE", 13),
             ("SMXE", 14), ("FSGSBASE", 16), ("PCIDE", 17), ("OSXSAVE", 18), ("SMEP", 20), ("SMAP", 21),
             ("PKE", 22))  # fmt: skip
_EFER = _bits(("SCE", 0), ("LME", 8), ("LMA", 10), ("NXE", 11), ("SVME", 12), ("LMSLE", 13), ("FFXSR", 14),
              ("TCE", 15))  # fmt: skip

_VEC128 = """\
  <vector id="v4f" type="ieee_single" count="4"/>
  <vector id="v2d" type="ieee_double" count="2"/>
  <vector id="v16i8" type="int8" count="16"/>
  <vector id="v8i16" type="int16" count="8"/>
  <vector id="v4i32" type="int32" count="4"/>
  <vector id="v2i64" type="int64" count="2"/>
  <union id="vec128">
    <field name="v4_float" type="v4f"/>
    <field name="v2_double" type="v2d"/>
    <field name="v16_int8" type="v16i8"/>
    <field name="v8_int16" type="v8i16"/>
    <field name="v4_int32" type="v4i32"/>
    <field name="v2_int64" type="v2i64"/>
    <field name="uint128" type="uint128"/>
  </union>"""

_FEATURE_TYPES = {
    CORE: _flags("x86_eflags", 4, _EFLAGS),
    SSE: _VEC128 + "\n" + _flags("x86_mxcsr", 4, _MXCSR),
    SEGMENTS: "",
    SYS: "\n".join((_flags("x86_cr0", 8, _CR0), _flags("x86_cr4", 8, _CR4), _flags("x86_efer", 8, _EFER))),
}


def _feature_xml(feature: str) -> str:
    lines = ['<?xml version="1.0"?>', '<!DOCTYPE feature SYSTEM "gdb-target.dtd">', f'<feature name="{feature}">']
    if _FEATURE_TYPES[feature]:
        lines.append(_FEATURE_TYPES[feature])
    for number, reg in enumerate(REGISTERS):
        if reg.feature == feature:
            group = f' group="{reg.group}"' if reg.group else ""
            lines.append(f'  <reg name="{reg.name}" bitsize="{reg.bitsize}" type="{reg.type}"'
                         f' regnum="{number}"{group}/>')
    lines.append("</feature>")
    return "\n".join(lines) + "\n"


def _target_xml() -> str:
    # xmlns:xi is what gdb-target.dtd fixes for xi:include; spelled out so a parser without the DTD
    # (xml.etree in the tests) reads the file too
    includes = [f'  <xi:include xmlns:xi="{XI_NAMESPACE}" href="{name}"/>' for name in _FEATURE_FILES.values()]
    return "\n".join(['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', '<target version="1.0">',
                      "  <architecture>i386:x86-64</architecture>", *includes, "</target>"]) + "\n"  # fmt: skip


#: every file ``qXfer:features:read`` serves, by annex
TARGET_DESCRIPTION: dict[str, bytes] = {"target.xml": _target_xml().encode()} | {
    name: _feature_xml(feature).encode() for feature, name in _FEATURE_FILES.items()
}
