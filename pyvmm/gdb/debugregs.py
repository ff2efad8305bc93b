"""gdb's hardware breakpoints and watchpoints (Z1-Z4) as x86 debug registers (Intel SDM vol. 3,
17.2: DR0-DR3 hold addresses, DR7 enables them and says what each watches, DR6 says which hit).

For the backends that arm breakpoints in the vCPU's debug registers (KVM_SET_GUEST_DEBUG, WHPX,
HVF): ``DebugRegisters`` hands out the four slots, ``dr7()`` and ``addresses()`` are what to load,
and ``hit(dr6)`` turns a debug exit back into the breakpoint gdb set. A watched range that is not
one aligned 1/2/4/8-byte piece takes one slot per aligned piece (as gdb's own x86 code splits it);
a request that does not fit in the free slots is refused whole. x86 has no read-only data
breakpoint: a read watchpoint (Z3) watches reads and writes, and is still reported as a read.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvmm.gdb.errors import DebugTargetError
from pyvmm.gdb.stub import BreakpointKind, StopReason

SLOTS = 4

# DR7 (SDM 17.2.4): G0..G3 at bits 1, 3, 5, 7; GE (bit 9) for exact data breakpoints; bit 10 is 1
DR7_FIXED = 1 << 10
DR7_GE = 1 << 9
# R/W field: what a slot watches
RW_EXECUTE, RW_WRITE, RW_READ_WRITE = 0b00, 0b01, 0b11
# LEN field by size (8 bytes only in 64-bit mode)
_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
#: DR6 bit for a single step (BS)
DR6_SINGLE_STEP = 1 << 14

_RW = {
    BreakpointKind.HARDWARE: RW_EXECUTE,
    BreakpointKind.WRITE_WATCH: RW_WRITE,
    BreakpointKind.READ_WATCH: RW_READ_WRITE,
    BreakpointKind.ACCESS_WATCH: RW_READ_WRITE,
}
_REASON = {
    BreakpointKind.HARDWARE: StopReason.HARDWARE_BREAKPOINT,
    BreakpointKind.WRITE_WATCH: StopReason.WATCH,
    BreakpointKind.READ_WATCH: StopReason.READ_WATCH,
    BreakpointKind.ACCESS_WATCH: StopReason.ACCESS_WATCH,
}


@dataclass(frozen=True)
class Slot:
    kind: BreakpointKind
    #: the aligned piece this debug register watches
    address: int
    size: int
    #: the request it serves, as gdb made it: (kind, address, length)
    request: tuple[BreakpointKind, int, int]


def aligned_pieces(address: int, length: int) -> list[tuple[int, int]]:
    """``[address, address+length)`` as aligned pieces of 1, 2, 4 or 8 bytes, largest first."""
    pieces = []
    end = address + length
    while address < end:
        size = next(s for s in (8, 4, 2, 1) if address % s == 0 and address + s <= end)
        pieces.append((address, size))
        address += size
    return pieces


class DebugRegisters:
    """The four address slots of one VM's vCPUs (gdb's breakpoints apply to every vCPU alike)."""

    def __init__(self):
        self.slots: list[Slot | None] = [None] * SLOTS

    def add(self, kind: BreakpointKind, address: int, length: int) -> None:
        if kind == BreakpointKind.SOFTWARE:
            raise DebugTargetError("a software breakpoint takes no debug register")
        if kind == BreakpointKind.HARDWARE:
            pieces = [(address, 1)]  # an instruction breakpoint's LEN must be 0 (one byte)
        else:
            if length not in _LEN:
                raise DebugTargetError(f"watchpoint length {length} (x86 watches 1, 2, 4 or 8 bytes)")
            pieces = aligned_pieces(address, length)
        request = (kind, address, length)
        if any(slot is not None and slot.request == request for slot in self.slots):
            return
        free = [i for i, slot in enumerate(self.slots) if slot is None]
        if len(pieces) > len(free):
            raise DebugTargetError(f"no free debug register for {kind.name.lower()} at {address:#x} "
                                   f"({len(pieces)} needed, {len(free)} free)")  # fmt: skip
        for index, (piece, size) in zip(free, pieces):
            self.slots[index] = Slot(kind, piece, size, request)

    def remove(self, kind: BreakpointKind, address: int, length: int) -> None:
        request = (kind, address, length)
        self.slots = [None if slot is not None and slot.request == request else slot for slot in self.slots]

    def clear(self) -> None:
        self.slots = [None] * SLOTS

    def __bool__(self) -> bool:
        return any(slot is not None for slot in self.slots)

    def addresses(self) -> list[int]:
        """DR0-DR3."""
        return [slot.address if slot is not None else 0 for slot in self.slots]

    def dr7(self) -> int:
        value = DR7_FIXED
        for index, slot in enumerate(self.slots):
            if slot is None:
                continue
            value |= 1 << (2 * index + 1)  # G<index>: enabled in every task
            value |= _RW[slot.kind] << (16 + 4 * index)
            value |= (_LEN[slot.size] if slot.kind != BreakpointKind.HARDWARE else 0) << (18 + 4 * index)
            if slot.kind != BreakpointKind.HARDWARE:
                value |= DR7_GE
        return value

    def hit(self, dr6: int) -> tuple[StopReason, int | None] | None:
        """The stop a debug exception with status ``dr6`` means: the reason and, for a watchpoint, the
        address gdb watched; None when no armed slot's B bit is set (a single step, or the guest's own
        debug registers)."""
        for index, slot in enumerate(self.slots):
            if slot is not None and dr6 & (1 << index):
                kind, address, _ = slot.request
                return _REASON[kind], (None if kind == BreakpointKind.HARDWARE else address)
        return None
