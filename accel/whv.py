"""Windows Hypervisor Platform register and exit formats a WHPX backend converts to and from.

Pure functions over the bitfield layouts of WinHvPlatformDefs.h (ffi/whpx.py has
the masks, with sources): segment attributes, the pending-interruption register
used for injection, and the access-info words of I/O-port and memory-access
exits. No hypervisor is needed to test them.
"""

from __future__ import annotations

from typing import NamedTuple

from pyvmm.accel.x86 import Segment
from pyvmm.ffi import whpx as w


def segment_to_whv(seg: Segment) -> tuple[int, int, int, int]:
    """(Base, Limit, Selector, Attributes) of a WHV_X64_SEGMENT_REGISTER; an unusable segment is not present."""
    return seg.base, seg.limit, seg.selector, seg.attributes()


def whv_to_segment(base: int, limit: int, selector: int, attributes: int) -> Segment:
    return Segment.from_attributes(selector, base, limit, attributes)


def pending_interruption(vector: int, kind: int = w.WHvX64PendingInterrupt, *, error_code: int | None = None,
                         instruction_length: int = 0) -> int:  # fmt: skip
    """The WHvRegisterPendingInterruption value that injects ``vector`` (an interrupt, NMI or exception)."""
    value = (w.PENDING_INTERRUPTION_PENDING | (kind << w.PENDING_INTERRUPTION_TYPE_SHIFT)
             | ((instruction_length & 0xF) << w.PENDING_INTERRUPTION_LENGTH_SHIFT)
             | ((vector & 0xFFFF) << w.PENDING_INTERRUPTION_VECTOR_SHIFT))  # fmt: skip
    if error_code is not None:
        value |= w.PENDING_INTERRUPTION_DELIVER_ERROR_CODE | ((error_code & 0xFFFFFFFF) << w.PENDING_INTERRUPTION_ERROR_CODE_SHIFT)
    return value


class IoAccess(NamedTuple):
    is_write: bool
    size: int
    string: bool
    rep: bool


def decode_io_access(info: int) -> IoAccess:
    """WHV_X64_IO_PORT_ACCESS_INFO: IsWrite, AccessSize (1, 2 or 4), StringOp, RepPrefix."""
    return IoAccess(bool(info & w.IO_ACCESS_IS_WRITE), (info >> w.IO_ACCESS_SIZE_SHIFT) & 7,
                    bool(info & w.IO_ACCESS_STRING_OP), bool(info & w.IO_ACCESS_REP_PREFIX))  # fmt: skip


class MemoryAccess(NamedTuple):
    kind: int  # 0 read, 1 write, 2 execute (WHV_MEMORY_ACCESS_TYPE)
    gpa_unmapped: bool
    gva_valid: bool


def decode_memory_access(info: int) -> MemoryAccess:
    return MemoryAccess(info & w.MEMORY_ACCESS_TYPE_MASK, bool(info & w.MEMORY_ACCESS_GPA_UNMAPPED),
                        bool(info & w.MEMORY_ACCESS_GVA_VALID))  # fmt: skip


def instruction_length(exit_context) -> int:
    """VpContext's 4-bit InstructionLength (shares a byte with Cr8)."""
    return exit_context.VpContext.InstructionLengthCr8 & 0xF
