"""Intel VMX formats a VMCS-based backend (Hypervisor.framework on Intel Macs) converts to and from.

Pure functions over the formats of the Intel SDM vol. 3 (chapter 24, "Virtual
Machine Control Structures", and chapter 27, "VM Exits"), with the field names
of Apple's hv_arch_vmx.h (ffi/hvf.py): guest segment access rights, the
interruption-information word used for injection and for exit/IDT-vectoring
information, the I/O-instruction exit qualification, the EPT-violation
qualification of an MMIO access, and control words constrained by the
capability MSRs. No hypervisor is needed to test them.
"""

from __future__ import annotations

from typing import NamedTuple

from pyvmm.accel.x86 import Segment

# --- guest segment access rights (SDM 24.4.1, Table 24-2) ----------------------
AR_TYPE_MASK = 0xF
AR_S = 1 << 4
AR_DPL_SHIFT = 5
AR_P = 1 << 7
AR_AVL = 1 << 12
AR_L = 1 << 13
AR_DB = 1 << 14
AR_G = 1 << 15
AR_UNUSABLE = 1 << 16


def segment_to_access_rights(seg: Segment) -> int:
    """The VMCS access-rights word of ``seg`` (an unusable segment has only bit 16 set)."""
    if seg.unusable or not seg.present:
        return AR_UNUSABLE
    return seg.attributes()


def access_rights_to_segment(selector: int, base: int, limit: int, rights: int) -> Segment:
    return Segment.from_attributes(selector, base, limit, rights & 0xFFFF, unusable=bool(rights & AR_UNUSABLE))


# --- interruption information (SDM 24.8.3, Table 24-16; 27.2.2) ------------------
INFO_VECTOR_MASK = 0xFF
INFO_TYPE_SHIFT = 8
INFO_TYPE_EXTERNAL, INFO_TYPE_NMI, INFO_TYPE_HARDWARE_EXCEPTION = 0, 2, 3
INFO_TYPE_SOFTWARE_INTERRUPT, INFO_TYPE_PRIVILEGED_SOFTWARE_EXCEPTION, INFO_TYPE_SOFTWARE_EXCEPTION = 4, 5, 6
INFO_ERROR_VALID = 1 << 11
INFO_VALID = 1 << 31


class Interruption(NamedTuple):
    vector: int
    type: int
    error_valid: bool


def interruption_info(vector: int, kind: int, *, error_code: bool = False) -> int:
    """The word written to VMCS_CTRL_VMENTRY_IRQ_INFO to inject ``vector`` of ``kind``."""
    return INFO_VALID | (kind << INFO_TYPE_SHIFT) | (INFO_ERROR_VALID if error_code else 0) | (vector & INFO_VECTOR_MASK)


def decode_interruption(info: int) -> Interruption | None:
    """An exit or IDT-vectoring information word; None when its valid bit is clear."""
    if not info & INFO_VALID:
        return None
    return Interruption(info & INFO_VECTOR_MASK, (info >> INFO_TYPE_SHIFT) & 7, bool(info & INFO_ERROR_VALID))


# --- I/O instruction exit qualification (SDM 27.2.1, Table 27-5) ------------------


class IoQualification(NamedTuple):
    port: int
    size: int  # 1, 2 or 4 bytes
    is_in: bool
    string: bool
    rep: bool


def decode_io(qualification: int) -> IoQualification:
    return IoQualification(
        port=(qualification >> 16) & 0xFFFF,
        size=(qualification & 7) + 1,
        is_in=bool(qualification & (1 << 3)),
        string=bool(qualification & (1 << 4)),
        rep=bool(qualification & (1 << 5)),
    )


# --- EPT violations (SDM 27.2.1, Table 27-7) ---------------------------------------
EPT_READ, EPT_WRITE, EPT_FETCH = 1 << 0, 1 << 1, 1 << 2
EPT_GLA_VALID, EPT_TRANSLATION = 1 << 7, 1 << 8


def ept_violation_is_mmio(qualification: int) -> bool:
    """A data read or write through a guest-linear address (not a fetch, not a page walk): what an
    MMIO access to unbacked guest-physical memory looks like (QEMU's ept_emulation_fault rule)."""
    if qualification & EPT_FETCH or not qualification & (EPT_READ | EPT_WRITE):
        return False
    return bool(qualification & EPT_GLA_VALID) and bool(qualification & EPT_TRANSLATION)


def ept_violation_is_write(qualification: int) -> bool:
    return bool(qualification & EPT_WRITE)


# --- control words (SDM A.3: allowed-0 settings in the low half, allowed-1 in the high half) ----


def constrain_controls(capability: int, wanted: int) -> int:
    """``wanted`` with the bits the processor requires set and the ones it cannot do cleared."""
    return (wanted | (capability & 0xFFFFFFFF)) & (capability >> 32)
