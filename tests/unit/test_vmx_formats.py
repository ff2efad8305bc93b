"""accel/vmx.py against the Intel SDM's formats (vol. 3, chapters 24 and 27)."""

from hypothesis import given
from hypothesis import strategies as st

from pyvmm.accel import vmx
from pyvmm.accel.x86 import Segment
from pyvmm.ffi import hvf


def test_access_rights_of_the_usual_segments():
    code64 = Segment(base=0, limit=0xFFFFFFFF, selector=8, type=11, s=True, l=True, g=True)
    assert vmx.segment_to_access_rights(code64) == 0xA09B  # P, S, type 11, L, G
    data = Segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=3, s=True, db=True, g=True)
    assert vmx.segment_to_access_rights(data) == 0xC093
    tss = Segment(base=0x1000, limit=0x67, selector=0x18, type=11, s=False)
    assert vmx.segment_to_access_rights(tss) == 0x8B
    assert vmx.segment_to_access_rights(Segment(unusable=True, present=False)) == 0x10000


@given(type_=st.integers(0, 15), s=st.booleans(), dpl=st.integers(0, 3), avl=st.booleans(), l=st.booleans(),
       db=st.booleans(), g=st.booleans(), base=st.integers(0, 2**64 - 1), limit=st.integers(0, 2**32 - 1))  # fmt: skip
def test_access_rights_round_trip(type_, s, dpl, avl, l, db, g, base, limit):  # noqa: E741
    seg = Segment(base=base, limit=limit, selector=0x23, type=type_, s=s, dpl=dpl, avl=avl, l=l, db=db, g=g)
    rights = vmx.segment_to_access_rights(seg)
    assert vmx.access_rights_to_segment(0x23, base, limit, rights) == seg


def test_interruption_information_encodes_as_apples_constants():
    assert vmx.interruption_info(0x30, vmx.INFO_TYPE_EXTERNAL) == hvf.IRQ_INFO_VALID | hvf.IRQ_INFO_EXT_IRQ | 0x30
    assert vmx.interruption_info(2, vmx.INFO_TYPE_NMI) == hvf.IRQ_INFO_VALID | hvf.IRQ_INFO_NMI | 2
    info = vmx.interruption_info(14, vmx.INFO_TYPE_HARDWARE_EXCEPTION, error_code=True)
    assert info == hvf.IRQ_INFO_VALID | hvf.IRQ_INFO_HARD_EXC | hvf.IRQ_INFO_ERROR_VALID | 14
    assert vmx.decode_interruption(info) == vmx.Interruption(14, 3, True)
    assert vmx.decode_interruption(0x30) is None  # valid bit clear


def test_io_qualification():
    # out dx, al with dx = 0x3f8: size 1, OUT, port in bits 16-31
    assert vmx.decode_io(0x03F8_0000) == vmx.IoQualification(0x3F8, 1, False, False, False)
    # rep insd from port 0x1f0: size 4 (3 + 1), IN, string, REP
    assert vmx.decode_io(0x01F0_0000 | 3 | 8 | 16 | 32) == vmx.IoQualification(0x1F0, 4, True, True, True)


def test_ept_violations_that_are_mmio():
    linear_read = vmx.EPT_READ | vmx.EPT_GLA_VALID | vmx.EPT_TRANSLATION
    assert vmx.ept_violation_is_mmio(linear_read) and not vmx.ept_violation_is_write(linear_read)
    assert vmx.ept_violation_is_mmio(vmx.EPT_WRITE | vmx.EPT_GLA_VALID | vmx.EPT_TRANSLATION)
    assert not vmx.ept_violation_is_mmio(vmx.EPT_FETCH | vmx.EPT_READ | vmx.EPT_GLA_VALID | vmx.EPT_TRANSLATION)
    assert not vmx.ept_violation_is_mmio(vmx.EPT_READ | vmx.EPT_GLA_VALID)  # a page-table walk, not the access
    assert not vmx.ept_violation_is_mmio(vmx.EPT_GLA_VALID | vmx.EPT_TRANSLATION)


def test_controls_respect_the_capability_msr():
    capability = (0xFFFF_0016 << 32) | 0x0000_0016  # must-be-one bits 1, 2, 4; allowed up to bit 31
    assert vmx.constrain_controls(capability, hvf.CPU_BASED_HLT) & hvf.CPU_BASED_HLT == 0  # bit 7 not allowed here
    assert vmx.constrain_controls(capability, 0) == 0x16
    assert vmx.constrain_controls((0xFFFFFFFF << 32) | 0x16, hvf.CPU_BASED_HLT) == 0x96
