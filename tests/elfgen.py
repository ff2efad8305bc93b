"""Build tiny PVH ELF guests from raw 32-bit code, for tests and benchmarks.

The entry is 32-bit protected mode with paging off (the PVH boot ABI); the
code is loaded at LOAD_ADDR and must not assume a stack.
"""

from __future__ import annotations

import struct

LOAD_ADDR = 0x100000

# a few encodings tests combine
OUT_F4_AL = b"\xe6\xf4"  # out 0xf4, al (debug exit)
HLT = b"\xf4"
UD2 = b"\x0f\x0b"
JMP_SELF = b"\xeb\xfe"


def mov_al(value: int) -> bytes:
    return b"\xb0" + bytes([value])


def pvh_elf(code: bytes, load_addr: int = LOAD_ADDR) -> bytes:
    """A minimal ELF32 with one PT_LOAD at ``load_addr`` and the Xen PVH entry note pointing at it."""
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", load_addr)
    ehsize, phsize = 52, 32
    note_off = ehsize + 2 * phsize
    code_off = (note_off + len(note) + 15) & ~15
    header = struct.pack(
        "<16sHHIIIIIHHHHHH",
        b"\x7fELF\x01\x01\x01" + bytes(9),
        2,  # ET_EXEC
        3,  # EM_386
        1,
        load_addr,
        ehsize,
        0,
        0,
        ehsize,
        phsize,
        2,
        40,
        0,
        0,
    )
    load = struct.pack("<IIIIIIII", 1, code_off, load_addr, load_addr, len(code), len(code), 5, 0x1000)
    pnote = struct.pack("<IIIIIIII", 4, note_off, 0, 0, len(note), len(note), 4, 4)
    body = header + load + pnote + note
    return body + bytes(code_off - len(body)) + code
