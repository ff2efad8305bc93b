"""vmm/x86/cpuid.build_cpuid: topology, feature trimming and hypervisor leaves."""

from __future__ import annotations

import pytest

from pyvmm.accel.x86 import CpuidEntry
from pyvmm.errors import ConfigError
from pyvmm.vmm.x86 import cpuid as c


def vendor_regs(vendor: str) -> tuple[int, int, int]:
    raw = vendor.encode()
    ebx, edx, ecx = (int.from_bytes(raw[i : i + 4], "little") for i in (0, 4, 8))
    return ebx, ecx, edx


def host_table(vendor: str = "GenuineIntel", *, tsc_deadline: bool = True) -> list[CpuidEntry]:
    """A table shaped like KVM_GET_SUPPORTED_CPUID on a modern CPU (all feature bits set where it matters)."""
    ebx, ecx, edx = vendor_regs(vendor)
    leaf1_ecx = 0xFFFFFFFF if tsc_deadline else 0xFFFFFFFF & ~c.ECX_TSC_DEADLINE
    return [
        CpuidEntry(0, 0, 0x1F, ebx, ecx, edx),
        CpuidEntry(1, 0, 0x000906EA, 0xFFFF0800, leaf1_ecx & ~c.ECX_HYPERVISOR, 0xFFFFFFFF),
        # leaf 4: L1d, L2, L3 and the terminator; host says 8 cores, 2 threads sharing L1
        CpuidEntry(4, 0, (7 << 26) | (1 << 14) | (1 << 5) | 1, 0x01C0003F, 0x3F, 0, indexed=True),
        CpuidEntry(4, 1, (7 << 26) | (1 << 14) | (2 << 5) | 3, 0x01C0003F, 0x3FF, 0, indexed=True),
        CpuidEntry(4, 2, (7 << 26) | (15 << 14) | (3 << 5) | 3, 0x03C0003F, 0x2FFF, 0, indexed=True),
        CpuidEntry(4, 3, 0, 0, 0, 0, indexed=True),
        CpuidEntry(5, 0, 0x40, 0x40, 3, 0x11142120),
        CpuidEntry(6, 0, 0x77, 2, 9, 0),
        CpuidEntry(7, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, indexed=True),
        CpuidEntry(0xA, 0, 0x07300404, 0, 0, 0x603),
        CpuidEntry(0xB, 0, 1, 2, 0x100, 7, indexed=True),
        CpuidEntry(0xB, 1, 4, 16, 0x201, 7, indexed=True),
        CpuidEntry(0x1F, 0, 1, 2, 0x100, 7, indexed=True),
        CpuidEntry(0x40000000, 0, 0x40000001, *vendor_regs("KVMKVMKVM\0\0\0")),
        CpuidEntry(0x40000001, 0, 0x01007AFB, 0, 0, 0),
        CpuidEntry(0x80000000, 0, 0x8000001E, ebx, ecx, edx),
        CpuidEntry(0x80000001, 0, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF),
        CpuidEntry(0x80000007, 0, 0, 0, 0, 0x1FF),
        CpuidEntry(0x80000008, 0, 0x3030, 0, 0x700F, 0),
    ]


def amd_table() -> list[CpuidEntry]:
    return host_table("AuthenticAMD") + [
        CpuidEntry(0x8000001D, 0, (1 << 14) | (1 << 5) | 1, 0x3F, 0x3F, 0, indexed=True),
        CpuidEntry(0x8000001D, 1, (15 << 14) | (3 << 5) | 3, 0x3F, 0xFFF, 0, indexed=True),
        CpuidEntry(0x8000001E, 0, 9, 0x104, 0x300, 0),
    ]


def get(table, function, index=0) -> CpuidEntry:
    matches = [e for e in table if e.function == function and e.index == index]
    assert len(matches) == 1, f"leaf {function:#x}.{index}: {matches}"
    return matches[0]


@pytest.mark.parametrize("index,count", [(0, 1), (1, 2), (3, 4), (5, 6)])
def test_leaf1_apic_id_and_logical_count(index, count):
    leaf1 = get(c.build_cpuid(host_table(), index, count), 1)
    assert leaf1.ebx >> 24 == index
    assert (leaf1.ebx >> 16) & 0xFF == count
    assert leaf1.ebx & 0xFFFF == 0x0800  # CLFLUSH line size kept
    assert bool(leaf1.edx & c.EDX_HTT) == (count > 1)


def test_hypervisor_bit_set_and_unsupported_features_cleared():
    leaf1 = get(c.build_cpuid(host_table(), 0, 1), 1)
    assert leaf1.ecx & c.ECX_HYPERVISOR
    for bit in (c.ECX_MONITOR, c.ECX_PDCM, c.ECX_VMX, c.ECX_SMX, c.ECX_EST, c.ECX_TM2, c.ECX_OSXSAVE):
        assert not leaf1.ecx & bit
    for bit in (c.EDX_ACPI, c.EDX_TM, c.EDX_PBE, c.EDX_DS):
        assert not leaf1.edx & bit


def test_tsc_deadline_only_when_supported():
    assert get(c.build_cpuid(host_table(tsc_deadline=True), 0, 1), 1).ecx & c.ECX_TSC_DEADLINE
    assert not get(c.build_cpuid(host_table(tsc_deadline=False), 0, 1), 1).ecx & c.ECX_TSC_DEADLINE


def test_power_management_leaves_trimmed():
    table = c.build_cpuid(host_table(), 0, 2)
    leaf5, leaf6, leaf_a = get(table, 5), get(table, 6), get(table, 0xA)
    assert (leaf5.eax, leaf5.ebx, leaf5.ecx, leaf5.edx) == (0, 0, 0, 0)
    assert (leaf6.eax, leaf6.ebx, leaf6.ecx, leaf6.edx) == (c.LEAF6_ARAT, 0, 0, 0)
    assert (leaf_a.eax, leaf_a.edx) == (0, 0)
    assert not get(table, 7).ecx & c.LEAF7_ECX_WAITPKG
    assert get(table, 0x80000007).edx == c.EXT7_EDX_INVARIANT_TSC
    assert not get(table, 0x80000001).ecx & c.EXT_ECX_SVM


@pytest.mark.parametrize("count", [1, 2, 3, 4, 8])
def test_leaf4_cores_and_sharing_match_the_vcpu_count(count):
    table = c.build_cpuid(host_table(), 0, count)
    for sub, level in ((0, 1), (1, 2), (2, 3)):
        eax = get(table, 4, sub).eax
        assert (eax >> 5) & 7 == level
        assert eax >> 26 == count - 1
        assert (eax >> 14) & 0xFFF == (count - 1 if level == 3 else 0)
        assert eax & 0x1F  # cache type kept
    assert get(table, 4, 3).eax == 0  # terminator untouched


@pytest.mark.parametrize("index,count", [(0, 1), (1, 2), (2, 3), (4, 5)])
def test_x2apic_topology_leaves(index, count):
    table = c.build_cpuid(host_table(), index, count)
    for fn in (0xB, 0x1F):
        smt, core, end = get(table, fn, 0), get(table, fn, 1), get(table, fn, 2)
        assert (smt.eax & 0x1F, smt.ebx, (smt.ecx >> 8) & 0xFF) == (0, 1, c.LEVEL_SMT)
        assert (core.ebx, (core.ecx >> 8) & 0xFF) == (count, c.LEVEL_CORE)
        # the core-level shift numbers every vCPU: all x2APIC IDs fit below 1 << shift
        assert (count - 1) >> (core.eax & 0x1F) == 0
        assert (end.ecx >> 8) & 0xFF == c.LEVEL_INVALID
        assert smt.edx == core.edx == end.edx == index
        assert smt.indexed and core.indexed


def test_no_topology_leaf_beyond_the_max_basic_leaf():
    table = [e for e in host_table() if e.function not in (0xB, 0x1F)]
    table[0] = CpuidEntry(0, 0, 0xA, table[0].ebx, table[0].ecx, table[0].edx)
    result = c.build_cpuid(table, 0, 2)
    assert not [e for e in result if e.function in (0xB, 0x1F)]


@pytest.mark.parametrize("signature", ["KVMKVMKVM", "KVMKVMKVM\0\0\0"])
def test_kvm_signature_keeps_kvm_leaves(signature):
    table = c.build_cpuid(host_table(), 0, 1, hypervisor_signature=signature)
    assert get(table, 0x40000000).ebx == int.from_bytes(b"KVMK", "little")
    assert get(table, 0x40000001).eax == 0x01007AFB


def test_other_signature_replaces_kvm_leaves():
    table = c.build_cpuid(host_table(), 0, 1, hypervisor_signature="PyvmmInterp")
    leaf = get(table, 0x40000000)
    raw = b"".join(r.to_bytes(4, "little") for r in (leaf.ebx, leaf.ecx, leaf.edx))
    assert raw == b"PyvmmInterp\0"
    assert leaf.eax == 0x40000000
    assert not [e for e in table if e.function == 0x40000001]


def test_no_signature_drops_hypervisor_leaves():
    table = c.build_cpuid(host_table(), 0, 1)
    assert not [e for e in table if 0x40000000 <= e.function < 0x40010000]


def test_amd_core_count_and_extended_topology():
    table = c.build_cpuid(amd_table(), 2, 3)
    ecx = get(table, 0x80000008).ecx
    assert ecx & 0xFF == 2 and (ecx >> 12) & 0xF == 2
    ext = get(table, 0x8000001E)
    assert ext.eax == 2 and ext.ebx & 0xFF == 2 and (ext.ebx >> 8) & 0xFF == 0
    assert (get(table, 0x8000001D, 0).eax >> 14) & 0xFFF == 0
    assert (get(table, 0x8000001D, 1).eax >> 14) & 0xFFF == 2
    assert get(table, 0x80000001).ecx & c.EXT_ECX_TOPOEXT


def test_intel_leaf_0x80000008_ecx_untouched():
    assert get(c.build_cpuid(host_table(), 0, 4), 0x80000008).ecx == 0x700F


def test_input_is_not_modified_and_output_sorted():
    table = host_table()
    before = list(table)
    result = c.build_cpuid(table, 1, 2)
    assert table == before
    assert result == sorted(result, key=lambda e: (e.function, e.index))


@pytest.mark.parametrize("index,count", [(2, 2), (-1, 2), (0, 0), (0, 300)])
def test_bad_topology_rejected(index, count):
    with pytest.raises(ConfigError):
        c.build_cpuid(host_table(), index, count)


def test_signature_too_long_rejected():
    with pytest.raises(ConfigError, match="longer than 12"):
        c.build_cpuid(host_table(), 0, 1, hypervisor_signature="A" * 13)
