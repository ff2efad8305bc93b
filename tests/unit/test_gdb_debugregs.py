"""gdb's hardware breakpoints and watchpoints as x86 debug registers: slot allocation, DR7's fields
(SDM vol. 3, 17.2.4), unaligned ranges split into aligned pieces, DR6 back to the breakpoint."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.gdb.debugregs import DR6_SINGLE_STEP, DebugRegisters, aligned_pieces
from pyvmm.gdb.errors import DebugTargetError
from pyvmm.gdb.stub import BreakpointKind, StopReason

HW, WRITE, READ, ACCESS = (BreakpointKind.HARDWARE, BreakpointKind.WRITE_WATCH, BreakpointKind.READ_WATCH,
                           BreakpointKind.ACCESS_WATCH)  # fmt: skip


def fields(dr7: int, index: int) -> tuple[int, int, int]:
    """(G bit, R/W, LEN) of slot ``index``."""
    return (dr7 >> (2 * index + 1)) & 1, (dr7 >> (16 + 4 * index)) & 3, (dr7 >> (18 + 4 * index)) & 3


def test_each_kind_in_dr7():
    regs = DebugRegisters()
    regs.add(HW, 0x401000, 1)
    regs.add(WRITE, 0x406000, 4)
    regs.add(ACCESS, 0x406010, 8)
    regs.add(READ, 0x406021, 1)
    assert regs.addresses() == [0x401000, 0x406000, 0x406010, 0x406021]
    dr7 = regs.dr7()
    assert fields(dr7, 0) == (1, 0b00, 0b00)  # execute, one byte
    assert fields(dr7, 1) == (1, 0b01, 0b11)  # write, 4 bytes
    assert fields(dr7, 2) == (1, 0b11, 0b10)  # read/write, 8 bytes
    assert fields(dr7, 3) == (1, 0b11, 0b00)  # reads: read/write (x86 has no read-only), 1 byte
    assert dr7 & (1 << 10) and dr7 & (1 << 9)  # the fixed bit, GE
    assert dr7 & 0b01010101 == 0  # no local enables


def test_hit_maps_dr6_back_to_gdbs_request():
    regs = DebugRegisters()
    regs.add(HW, 0x401000, 1)
    regs.add(WRITE, 0x406002, 4)  # unaligned: slots 1 (2 bytes at ...02) and 2 (2 bytes at ...04)
    assert regs.addresses()[1:3] == [0x406002, 0x406004]
    assert regs.hit(0b0001) == (StopReason.HARDWARE_BREAKPOINT, None)
    assert regs.hit(0b0100) == (StopReason.WATCH, 0x406002)
    assert regs.hit(DR6_SINGLE_STEP) is None
    assert regs.hit(0b1000) is None  # a slot gdb did not arm


def test_slots_run_out_and_a_request_that_does_not_fit_is_refused_whole():
    regs = DebugRegisters()
    for i in range(3):
        regs.add(HW, 0x401000 + i, 1)
    message = r"no free debug register for write_watch at 0x406007 \(2 needed, 1 free\)"
    with pytest.raises(DebugTargetError, match=message):
        regs.add(WRITE, 0x406007, 2)
    assert regs.slots[3] is None
    regs.add(WRITE, 0x406006, 2)
    with pytest.raises(DebugTargetError, match="no free debug register"):
        regs.add(HW, 0x402000, 1)
    regs.add(HW, 0x401000, 1)  # the same request again takes nothing
    regs.remove(HW, 0x401001, 1)
    regs.add(HW, 0x402000, 1)
    assert regs.addresses() == [0x401000, 0x402000, 0x401002, 0x406006]
    regs.clear()
    assert not regs and regs.dr7() == 1 << 10


def test_bad_requests():
    regs = DebugRegisters()
    with pytest.raises(DebugTargetError, match="length 3"):
        regs.add(WRITE, 0x1000, 3)
    with pytest.raises(DebugTargetError, match="software breakpoint"):
        regs.add(BreakpointKind.SOFTWARE, 0x1000, 1)


@given(st.integers(0, 1 << 48), st.sampled_from([1, 2, 4, 8]))
def test_aligned_pieces_cover_the_range_exactly(address, length):
    pieces = aligned_pieces(address, length)
    assert pieces[0][0] == address
    assert sum(size for _, size in pieces) == length
    for (start, size), following in zip(pieces, pieces[1:] + [(address + length, 0)]):
        assert start % size == 0 and start + size == following[0]
    assert len(pieces) <= 4
