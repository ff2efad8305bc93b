"""The x86-64 target description (parsed with xml.etree, includes resolved) and the register file
codec: the g layout in the description's order and sizes, values from Regs/SpecialRegs/FpuState,
round trips, single registers, the x87 tag word."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.accel.x86 import FpuState, Regs, Segment, SpecialRegs
from pyvmm.gdb import target
from pyvmm.gdb.errors import GdbError
from pyvmm.gdb.target import (REGISTER_FILE_SIZE, REGISTERS, TARGET_DESCRIPTION, VcpuRegisters, decode_register,
                              decode_registers, encode_register, encode_registers, full_tag_word,
                              register_number)  # fmt: skip

XI_INCLUDE = "{http://www.w3.org/2001/XInclude}include"


def described_registers() -> tuple[str, list[tuple[str, ET.Element]]]:
    """(architecture, [(feature name, reg element)]) from target.xml with its includes."""
    root = ET.fromstring(TARGET_DESCRIPTION["target.xml"])
    assert root.tag == "target"
    architecture = root.find("architecture").text
    regs = []
    for include in root.iter(XI_INCLUDE):
        feature = ET.fromstring(TARGET_DESCRIPTION[include.get("href")])
        assert feature.tag == "feature"
        regs += [(feature.get("name"), reg) for reg in feature.iter("reg")]
    return architecture, regs


def test_description_names_the_architecture_features_and_every_register_in_order():
    architecture, regs = described_registers()
    assert architecture == "i386:x86-64"
    names = [reg.get("name") for _, reg in regs]
    gprs = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
    x87 = [f"st{i}" for i in range(8)] + ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
    assert names == (gprs + ["rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs"] + x87
                     + [f"xmm{i}" for i in range(16)] + ["mxcsr", "fs_base", "gs_base", "k_gs_base",
                                                          "cr0", "cr2", "cr3", "cr4", "cr8", "efer"])  # fmt: skip
    features = {name: feature for feature, name in ((f, r.get("name")) for f, r in regs)}
    assert features["rax"] == features["st7"] == features["fop"] == "org.gnu.gdb.i386.core"
    assert features["xmm15"] == features["mxcsr"] == "org.gnu.gdb.i386.sse"
    assert features["fs_base"] == features["k_gs_base"] == "org.gnu.gdb.i386.segments"
    assert features["cr0"] == features["efer"] == "org.gnu.gdb.i386.sys"
    # the register numbers gdb will use in p/P are the codec's
    assert [int(reg.get("regnum")) for _, reg in regs] == list(range(len(REGISTERS)))
    assert [int(reg.get("bitsize")) for _, reg in regs] == [r.bitsize for r in REGISTERS]


def test_every_type_a_register_uses_is_defined_or_built_in():
    builtin = {"int", "int32", "int64", "data_ptr", "code_ptr", "i387_ext", "uint128"}
    for name, text in TARGET_DESCRIPTION.items():
        if name == "target.xml":
            continue
        feature = ET.fromstring(text)
        defined = {e.get("id") for e in feature if e.tag in ("flags", "union", "vector", "struct")}
        for reg in feature.iter("reg"):
            assert reg.get("type") in builtin | defined, (name, reg.get("name"))


def test_sizes():
    sizes = {r.name: r.size for r in REGISTERS}
    assert sizes["rax"] == sizes["rip"] == sizes["fs_base"] == sizes["cr3"] == sizes["efer"] == 8
    assert sizes["eflags"] == sizes["cs"] == sizes["fop"] == sizes["mxcsr"] == 4
    assert sizes["st0"] == 10 and sizes["xmm0"] == 16
    assert REGISTER_FILE_SIZE == 16 * 8 + 8 + 4 + 6 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4 + 3 * 8 + 6 * 8


def sample_registers() -> VcpuRegisters:
    regs = Regs(**{name: 0x1000_0000_0000_0000 + i for i, name in enumerate(Regs.__dataclass_fields__)})
    regs.rflags = 0x246
    sregs = SpecialRegs(cs=Segment(selector=0x10), ss=Segment(selector=0x18), ds=Segment(selector=0x20),
                        es=Segment(selector=0x28), fs=Segment(selector=0x30, base=0x7F00_1234_5000),
                        gs=Segment(selector=0x38, base=0xFFFF_8880_1234_0000), cr0=0x8005_0033, cr2=0xDEAD_B000,
                        cr3=0x12_3000, cr4=0x3_06F0, cr8=0xF, efer=0xD01)  # fmt: skip
    pi = bytes.fromhex("35c26821a2da0fc90040")  # 3.14159... as an 80-bit extended value
    fpu = FpuState(fcw=0x37F, fsw=0x3800, ftwx=0x80, last_opcode=0x7DB, last_ip=0xFFFF_1234_5678_9ABC,
                   last_dp=0x0000_4321_8765_4321, mxcsr=0x1FA0,
                   fpr=[pi + b"\xaa" * 6] + [bytes(16)] * 7,
                   xmm=[bytes([i]) * 16 for i in range(16)])  # fmt: skip
    return VcpuRegisters(regs, sregs, fpu, kernel_gs_base=0xFFFF_8880_0000_1000)


def offsets() -> dict[str, int]:
    out, at = {}, 0
    for reg in REGISTERS:
        out[reg.name] = at
        at += reg.size
    return out


def field(image: bytes, name: str) -> int:
    at = offsets()[name]
    return int.from_bytes(image[at : at + REGISTERS[register_number(name)].size], "little")


def test_encode_takes_each_value_from_its_place():
    cpu = sample_registers()
    image = encode_registers(cpu)
    assert len(image) == REGISTER_FILE_SIZE
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r15", "rip"):
        assert field(image, name) == getattr(cpu.regs, name), name
    assert field(image, "eflags") == 0x246
    for name in ("cs", "ss", "ds", "es", "fs", "gs"):
        assert field(image, name) == getattr(cpu.sregs, name).selector
    assert image[offsets()["st0"] : offsets()["st0"] + 10] == cpu.fpu.fpr[0][:10]
    assert field(image, "fctrl") == 0x37F and field(image, "fstat") == 0x3800
    assert field(image, "fioff") == 0x5678_9ABC and field(image, "fiseg") == 0x1234
    assert field(image, "fooff") == 0x8765_4321 and field(image, "foseg") == 0x4321
    assert field(image, "fop") == 0x7DB
    assert image[offsets()["xmm3"] : offsets()["xmm3"] + 16] == b"\x03" * 16
    assert field(image, "mxcsr") == 0x1FA0
    assert field(image, "fs_base") == cpu.sregs.fs.base and field(image, "gs_base") == cpu.sregs.gs.base
    assert field(image, "k_gs_base") == cpu.kernel_gs_base
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
        assert field(image, name) == getattr(cpu.sregs, name), name


def test_full_tag_word_from_the_abridged_one():
    # TOP = 7 (fsw bits 11-13): ST(0) is physical R7, marked valid in the abridged tag (bit 7)
    cpu = sample_registers()
    tag = full_tag_word(cpu.fpu)
    assert tag == 0x3FFF  # R7 valid (00), every other register empty (11)
    cpu.fpu.ftwx = 0xC0  # R6 = ST(7) (zero) in use too
    assert full_tag_word(cpu.fpu) == 0x1FFF  # R6 tagged zero (01)
    cpu.fpu.fpr = list(cpu.fpu.fpr)
    cpu.fpu.fpr[7] = b"\x00" * 8 + b"\xff\x7f" + bytes(6)  # ST(7) = R6: exponent all ones, a special
    assert full_tag_word(cpu.fpu) == 0x2FFF
    # a write of the full tag keeps only in-use-or-not, as FXSAVE does
    updated = decode_register(cpu, register_number("ftag"), struct.pack("<I", 0xFFFC))
    assert updated.fpu.ftwx == 0x01


def test_g_image_round_trips_through_decode():
    cpu = sample_registers()
    image = encode_registers(cpu)
    assert encode_registers(decode_registers(VcpuRegisters(), image)) == image
    assert decode_registers(cpu, image) == cpu


def test_decode_does_not_touch_its_input_and_keeps_what_gdb_cannot_see():
    cpu = sample_registers()
    image = bytearray(encode_registers(cpu))
    at = offsets()["rip"]
    image[at : at + 8] = (0x401000).to_bytes(8, "little")
    out = decode_registers(cpu, bytes(image))
    assert out.regs.rip == 0x401000 and cpu.regs.rip != 0x401000
    assert out.sregs.cs.type == cpu.sregs.cs.type and out.sregs.gdt == cpu.sregs.gdt
    assert out.fpu.fpr[0][10:] == cpu.fpu.fpr[0][10:]  # FXSAVE's reserved bytes beside st0
    assert out.fpu.last_ip >> 48 == 0xFFFF  # bits FXSAVE64 has and gdb's fiseg/fioff do not


def test_single_registers():
    cpu = sample_registers()
    rip = register_number("rip")
    assert encode_register(cpu, rip) == cpu.regs.rip.to_bytes(8, "little")
    assert decode_register(cpu, rip, (0x1234).to_bytes(8, "little")).regs.rip == 0x1234
    cr3 = register_number("cr3")
    assert decode_register(cpu, cr3, (0x9000).to_bytes(8, "little")).sregs.cr3 == 0x9000
    gs = register_number("gs")
    assert decode_register(cpu, gs, (0x2B).to_bytes(4, "little")).sregs.gs.selector == 0x2B
    with pytest.raises(GdbError, match="no register number 66"):
        encode_register(cpu, len(REGISTERS))
    with pytest.raises(GdbError, match="rip is 8 bytes, got 4"):
        decode_register(cpu, rip, b"\0" * 4)
    with pytest.raises(GdbError, match="register image is 608 bytes, got 607"):
        decode_registers(cpu, b"\0" * 607)


@given(st.binary(min_size=REGISTER_FILE_SIZE, max_size=REGISTER_FILE_SIZE))
def test_fuzz_any_image_decodes_and_encodes_back(image):
    # except the bits gdb's view cannot hold: the x87 tag is in-use-or-not per register and
    # recomputed from the values; selectors are 16 bits in 32-bit slots, fop 11 bits
    cpu = decode_registers(VcpuRegisters(), image)
    again = encode_registers(cpu)
    at_of = offsets()
    for reg in REGISTERS:
        at = at_of[reg.name]
        sent, back = image[at : at + reg.size], again[at : at + reg.size]
        if reg.name == "ftag":
            sent_in_use = [(int.from_bytes(sent, "little") >> (2 * i)) & 3 != 3 for i in range(8)]
            back_in_use = [(int.from_bytes(back, "little") >> (2 * i)) & 3 != 3 for i in range(8)]
            assert sent_in_use == back_in_use
        elif reg.name in ("cs", "ss", "ds", "es", "fs", "gs", "fctrl", "fstat", "fiseg", "foseg"):
            assert back == sent[:2] + b"\0\0", reg.name
        elif reg.name == "fop":
            assert int.from_bytes(back, "little") == int.from_bytes(sent, "little") & 0x7FF
        else:
            assert back == sent, reg.name


def test_module_exports():
    assert target.register_number("efer") == len(REGISTERS) - 1
    with pytest.raises(GdbError, match="no register named 'dr7'"):
        register_number("dr7")
