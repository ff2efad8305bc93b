"""accel/whv.py against WinHvPlatformDefs.h's bitfields (values in shared/notes/hvf-whpx-headers.md 3.6-3.8)."""

from hypothesis import given
from hypothesis import strategies as st

from pyvmm.accel import whv
from pyvmm.accel.x86 import Segment
from pyvmm.ffi import whpx
from pyvmm.ffi.whpx import ffi


def test_segment_attributes():
    code64 = Segment(base=0, limit=0xFFFFFFFF, selector=8, type=11, s=True, l=True, g=True)
    assert whv.segment_to_whv(code64) == (0, 0xFFFFFFFF, 8, 0xA09B)
    _, _, _, attributes = whv.segment_to_whv(Segment(unusable=True))
    assert not attributes & whpx.SEGMENT_PRESENT


@given(type_=st.integers(0, 15), s=st.booleans(), dpl=st.integers(0, 3), avl=st.booleans(), l=st.booleans(),
       db=st.booleans(), g=st.booleans(), present=st.booleans())  # fmt: skip
def test_segments_round_trip(type_, s, dpl, avl, l, db, g, present):  # noqa: E741
    seg = Segment(base=0x1234, limit=0xFFFF, selector=0x2B, type=type_, s=s, dpl=dpl, avl=avl, l=l, db=db, g=g,
                  present=present, unusable=not present)  # fmt: skip
    assert whv.whv_to_segment(*whv.segment_to_whv(seg)) == seg


def test_pending_interruption_matches_the_headers_bitfield():
    # the gcc-checked value of the notes: Pending, type exception, error code, length 15, vector 0x1234
    assert whv.pending_interruption(0x1234, whpx.WHvX64PendingException, error_code=0xDEADBEEF,
                                    instruction_length=0xF) == 0xDEADBEEF123401F7  # fmt: skip
    assert whv.pending_interruption(0x30) == 1 | (0x30 << 16)
    assert whv.pending_interruption(2, whpx.WHvX64PendingNmi) == 1 | (2 << 1) | (2 << 16)


def test_access_infos_and_instruction_length():
    assert whv.decode_io_access(1 | (4 << 1) | (1 << 4) | (1 << 5)) == whv.IoAccess(True, 4, True, True)
    assert whv.decode_io_access(1 << 1) == whv.IoAccess(False, 1, False, False)
    assert whv.decode_memory_access(1 | (1 << 2) | (1 << 3)) == whv.MemoryAccess(1, True, True)
    context = ffi.new("WHV_RUN_VP_EXIT_CONTEXT *")
    context.VpContext.InstructionLengthCr8 = 0xA5  # length 5, CR8 0xa (the notes' gcc check)
    assert whv.instruction_length(context) == 5
