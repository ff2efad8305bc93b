"""Small instruction-encoding facts (Intel SDM vol. 2, chapter 2), for the few places that need them."""

from __future__ import annotations

STI = 0xFB
POP_SS = 0x17  # invalid in 64-bit mode
MOV_SREG = 0x8E  # mov Sreg, r/m16: ModRM.reg selects the segment register
SREG_SS = 2


def modrm_length(modrm: int, sib: int | None, *, addr16: bool) -> int:
    """Bytes taken by a ModRM byte and what it implies (SIB, displacement), the ModRM byte included."""
    mod, rm = modrm >> 6, modrm & 7
    if mod == 3:
        return 1
    if addr16:
        if mod == 0:
            return 3 if rm == 6 else 1
        return 2 if mod == 1 else 3
    length = 1
    if rm == 4:  # a SIB byte follows
        length += 1
        if mod == 0 and sib is not None and sib & 7 == 5:
            return length + 4
    elif mod == 0 and rm == 5:  # disp32 (RIP-relative in 64-bit mode)
        return length + 4
    return length + (1 if mod == 1 else 4 if mod == 2 else 0)


def ends_with_shadow_instruction(code: bytes, *, code64: bool, addr16: bool = False) -> bool:
    """Do the bytes just before an instruction boundary end with sti, ``mov ss, r/m`` or ``pop ss``?

    Those are the instructions that block interrupts for one instruction (the
    "interrupt shadow"). ``code`` are the bytes that precede the boundary.
    """
    if not code:
        return False
    if code[-1] == STI:
        return True
    if code[-1] == POP_SS and not code64:
        return True
    for start in range(max(0, len(code) - 8), len(code) - 1):
        if code[start] != MOV_SREG or (code[start + 1] >> 3) & 7 != SREG_SS:
            continue
        sib = code[start + 2] if start + 2 < len(code) else None
        if start + 1 + modrm_length(code[start + 1], sib, addr16=addr16) == len(code):
            return True
    return False


LEGACY_PREFIXES = frozenset((0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65))
REP_PREFIXES = frozenset((0xF2, 0xF3))
ADDRESS_SIZE_PREFIX = 0x67


def rep_count_mask(code: bytes, *, code_bits: int) -> int | None:
    """For a REP-prefixed instruction, the mask of the count register it uses (RCX, ECX or CX by the
    address size, SDM vol. 2 "REP/REPE/REPZ"); None when ``code`` has no REP prefix."""
    rep = override = False
    for byte in code:
        if byte in REP_PREFIXES:
            rep = True
        elif byte == ADDRESS_SIZE_PREFIX:
            override = True
        elif byte not in LEGACY_PREFIXES and not (code_bits == 64 and 0x40 <= byte <= 0x4F):
            break
    if not rep:
        return None
    bits = {64: 32 if override else 64, 32: 16 if override else 32, 16: 32 if override else 16}[code_bits]
    return (1 << bits) - 1
