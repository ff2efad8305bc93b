"""arch/x86/insn.py: which bytes before a boundary make an interrupt shadow."""

from pyvmm.arch.x86.insn import ends_with_shadow_instruction, modrm_length


def test_sti_and_pop_ss_end_a_shadow():
    assert ends_with_shadow_instruction(b"\x90\x90\xfb", code64=True)
    assert ends_with_shadow_instruction(b"\x90\x17", code64=False)
    assert not ends_with_shadow_instruction(b"\x90\x17", code64=True)  # pop ss is invalid in 64-bit code


def test_mov_ss_forms_end_a_shadow():
    assert ends_with_shadow_instruction(b"\x90\x8e\xd0", code64=True)  # mov ss, eax
    assert ends_with_shadow_instruction(b"\x8e\x50\x08", code64=True)  # mov ss, [rax+8]
    assert ends_with_shadow_instruction(b"\x8e\x15\x00\x10\x00\x00", code64=True)  # mov ss, [rip+0x1000]
    assert ends_with_shadow_instruction(b"\x8e\x14\x24", code64=True)  # mov ss, [rsp]
    assert ends_with_shadow_instruction(b"\x8e\x16\x34\x12", code64=False, addr16=True)  # mov ss, [0x1234]
    assert not ends_with_shadow_instruction(b"\x8e\xd8", code64=True)  # mov ds, eax: no shadow


def test_pause_and_other_instructions_do_not():
    assert not ends_with_shadow_instruction(b"\xfb\xf3\x90", code64=True)  # sti; pause: the shadow is over
    assert not ends_with_shadow_instruction(b"\x48\xff\xc0", code64=True)
    assert not ends_with_shadow_instruction(b"", code64=True)


def test_modrm_lengths():
    assert modrm_length(0xC0, None, addr16=False) == 1
    assert modrm_length(0x05, None, addr16=False) == 5  # disp32
    assert modrm_length(0x44, 0x24, addr16=False) == 3  # SIB + disp8
    assert modrm_length(0x04, 0x25, addr16=False) == 6  # SIB with base 5: disp32
    assert modrm_length(0x06, None, addr16=True) == 3  # 16-bit [disp16]
