"""The VMM's CPUID filter, shared by every backend.

``build_cpuid`` takes what a backend can present (``supported``: KVM's
``KVM_GET_SUPPORTED_CPUID``, or the interpreter's own table) and returns the
table for one vCPU: a topology of ``vcpu_count`` single-thread cores in one
package, the hypervisor bit, and no features pyvmm does not virtualize.
Each decision is one line below, next to the code that makes it.
"""

from __future__ import annotations

from dataclasses import replace

from pyvmm.accel.x86 import CpuidEntry
from pyvmm.errors import ConfigError

KVM_SIGNATURE = "KVMKVMKVM"
HYPERVISOR_BASE = 0x40000000

# leaf 1 ECX
ECX_MONITOR = 1 << 3
ECX_DS_CPL = 1 << 4
ECX_VMX = 1 << 5
ECX_SMX = 1 << 6
ECX_EST = 1 << 7
ECX_TM2 = 1 << 8
ECX_XTPR = 1 << 14
ECX_PDCM = 1 << 15
ECX_DCA = 1 << 18
ECX_TSC_DEADLINE = 1 << 24
ECX_OSXSAVE = 1 << 27
ECX_HYPERVISOR = 1 << 31
# leaf 1 EDX
EDX_DS = 1 << 21
EDX_ACPI = 1 << 22
EDX_HTT = 1 << 28
EDX_TM = 1 << 29
EDX_PBE = 1 << 31
# leaf 6 EAX
LEAF6_ARAT = 1 << 2
# leaf 7.0 ECX
LEAF7_ECX_WAITPKG = 1 << 5
# leaf 0x80000001 ECX
EXT_ECX_SVM = 1 << 2
EXT_ECX_CMP_LEGACY = 1 << 1
EXT_ECX_TOPOEXT = 1 << 22
# leaf 0x80000007 EDX
EXT7_EDX_INVARIANT_TSC = 1 << 8

LEAF1_ECX_CLEAR = (
    ECX_MONITOR  # MONITOR/MWAIT: idle is HLT, which the hypervisor sees
    | ECX_DS_CPL | ECX_EST | ECX_TM2 | ECX_XTPR | ECX_DCA  # debug store, SpeedStep, thermal, xTPR, DCA: no such hardware
    | ECX_PDCM  # no perf/debug capability MSR
    | ECX_VMX | ECX_SMX  # no nested virtualization, no TXT
    | ECX_OSXSAVE  # mirrors the guest's CR4.OSXSAVE; the CPU (or backend) computes it
)
LEAF1_EDX_CLEAR = EDX_DS | EDX_ACPI | EDX_TM | EDX_PBE  # debug store, thermal monitor, pending-break: no such hardware

# topology level types of leaves 0xB / 0x1F (ECX[15:8])
LEVEL_INVALID, LEVEL_SMT, LEVEL_CORE = 0, 1, 2


def _bits_for(count: int) -> int:
    """Width of the x2APIC ID field that numbers ``count`` items."""
    return max(count - 1, 0).bit_length()


def _vendor(entries: dict) -> str:
    leaf0 = entries.get((0, 0))
    if leaf0 is None:
        return ""
    return b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx)).decode("latin-1")


def _signature_regs(signature: str) -> tuple[int, int, int]:
    raw = signature.encode("ascii")
    if len(raw) > 12:
        raise ConfigError(f"hypervisor signature {signature!r} is longer than 12 bytes")
    raw = raw.ljust(12, b"\0")
    return tuple(int.from_bytes(raw[i : i + 4], "little") for i in (0, 4, 8))


def _topology_leaf(function: int, vcpu_index: int, vcpu_count: int) -> list[CpuidEntry]:
    """Leaf 0xB/0x1F: an SMT level of 1 thread per core, a core level of ``vcpu_count`` cores."""
    core_shift = _bits_for(vcpu_count)
    return [
        CpuidEntry(function, 0, 0, 1, (LEVEL_SMT << 8) | 0, vcpu_index, indexed=True),
        CpuidEntry(function, 1, core_shift, vcpu_count, (LEVEL_CORE << 8) | 1, vcpu_index, indexed=True),
        CpuidEntry(function, 2, 0, 0, (LEVEL_INVALID << 8) | 2, vcpu_index, indexed=True),
    ]


def build_cpuid(
    supported: list[CpuidEntry],
    vcpu_index: int,
    vcpu_count: int,
    *,
    hypervisor_signature: str | None = None,
) -> list[CpuidEntry]:
    """The CPUID table of vCPU ``vcpu_index`` (also its APIC ID) in a VM of ``vcpu_count`` vCPUs.

    ``hypervisor_signature``: the 0x40000000 vendor string (up to 12 bytes, NUL-padded).
    ``"KVMKVMKVM"`` keeps KVM's paravirtual leaves (only the KVM backend may pass it),
    another string presents just that signature, ``None`` drops the hypervisor leaves.
    """
    if not 0 <= vcpu_index < vcpu_count:
        raise ConfigError(f"vCPU index {vcpu_index} is outside 0..{vcpu_count - 1}")
    if vcpu_count > 255:
        raise ConfigError(f"{vcpu_count} vCPUs do not fit the 8-bit xAPIC ID of CPUID leaf 1")
    if hypervisor_signature is not None:
        hypervisor_signature = hypervisor_signature.rstrip("\0")  # "KVMKVMKVM\0\0\0" is the same signature
    by_key = {(e.function, e.index): e for e in supported}
    amd = _vendor(by_key) in ("AuthenticAMD", "HygonGenuine")
    result: list[CpuidEntry] = []

    for entry in supported:
        fn, eax, ebx, ecx, edx = entry.function, entry.eax, entry.ebx, entry.ecx, entry.edx
        if fn == 1:
            # EBX: initial APIC ID = vCPU index; logical processors per package = vCPU count; CLFLUSH size kept.
            ebx = (ebx & 0x0000FFFF) | (vcpu_count << 16) | (vcpu_index << 24)
            ecx = (ecx & ~LEAF1_ECX_CLEAR) | ECX_HYPERVISOR  # tell the guest it is virtualized
            # TSC-deadline stays only when the backend offered it (no forcing on).
            edx &= ~LEAF1_EDX_CLEAR
            # HTT means "EBX[23:16] is valid"; Linux reads the package size from it when set.
            edx = edx | EDX_HTT if vcpu_count > 1 else edx & ~EDX_HTT
        elif fn == 4:
            cache_level = (eax >> 5) & 7
            if cache_level == 0:  # terminating sub-leaf: copy as is
                pass
            else:
                # cores per package - 1 = vCPU count - 1; L1/L2 are per core (1 thread), L3 shared by all.
                sharing = vcpu_count - 1 if cache_level >= 3 else 0
                eax = (eax & 0x00003FFF) | (sharing << 14) | ((vcpu_count - 1) << 26)
        elif fn == 5:
            eax = ebx = ecx = edx = 0  # no MONITOR/MWAIT (cleared in leaf 1)
        elif fn == 6:
            # Power management is the host's; keep only ARAT (the virtual LAPIC timer never stops in C-states).
            eax, ebx, ecx, edx = eax & LEAF6_ARAT, 0, 0, 0
        elif fn == 7 and entry.index == 0:
            ecx &= ~LEAF7_ECX_WAITPKG  # UMWAIT/TPAUSE: power-state instructions, not virtualized
        elif fn == 0xA:
            eax = ebx = ecx = edx = 0  # no architectural PMU: counters are not virtualized by every backend
        elif fn in (0xB, 0x1F):
            continue  # rebuilt below from vcpu_index/vcpu_count
        elif HYPERVISOR_BASE <= fn < HYPERVISOR_BASE + 0x10000:
            # KVM's own leaves (paravirtual features) are only true when the backend is KVM.
            if hypervisor_signature == KVM_SIGNATURE and fn in (HYPERVISOR_BASE, HYPERVISOR_BASE + 1):
                result.append(entry)
            continue
        elif fn == 0x80000001:
            ecx &= ~EXT_ECX_SVM  # no nested virtualization
            # CMP_LEGACY ("HTT is cores") is stale for our topology; TOPOEXT stays only with leaf 0x8000001E.
            ecx &= ~EXT_ECX_CMP_LEGACY
            if (0x8000001E, 0) not in by_key:
                ecx &= ~EXT_ECX_TOPOEXT
        elif fn == 0x80000007:
            edx &= EXT7_EDX_INVARIANT_TSC  # power management is the host's; keep only the invariant TSC bit
            eax = ebx = ecx = 0
        elif fn == 0x80000008 and amd:
            # AMD core count: NC = cores - 1, ApicIdCoreIdSize = bits for the core number.
            ecx = (ecx & ~0xF0FF) | (vcpu_count - 1) | (_bits_for(vcpu_count) << 12)
        elif fn == 0x8000001D:
            if eax & 0x1F:  # a cache, not the terminating sub-leaf
                cache_level = (eax >> 5) & 7
                sharing = vcpu_count - 1 if cache_level >= 3 else 0
                eax = (eax & ~(0xFFF << 14)) | (sharing << 14)
        elif fn == 0x8000001E:
            # extended APIC ID = vCPU index; compute unit = vCPU index with one thread; node 0.
            eax, ebx, ecx = vcpu_index, vcpu_index & 0xFF, 0
        result.append(replace(entry, eax=eax & 0xFFFFFFFF, ebx=ebx & 0xFFFFFFFF, ecx=ecx & 0xFFFFFFFF,
                              edx=edx & 0xFFFFFFFF))

    # x2APIC topology, consistent with leaf 1 and leaf 4, when the backend has the leaf at all.
    max_basic = by_key[(0, 0)].eax if (0, 0) in by_key else 0
    for fn in (0xB, 0x1F):
        if fn <= max_basic and (fn == 0xB or (fn, 0) in by_key):
            result.extend(_topology_leaf(fn, vcpu_index, vcpu_count))

    # The hypervisor vendor leaf for a backend other than KVM: the signature alone, no feature leaves.
    if hypervisor_signature is not None and hypervisor_signature != KVM_SIGNATURE:
        ebx, ecx, edx = _signature_regs(hypervisor_signature)
        result.append(CpuidEntry(HYPERVISOR_BASE, 0, HYPERVISOR_BASE, ebx, ecx, edx))
    elif hypervisor_signature == KVM_SIGNATURE and (HYPERVISOR_BASE, 0) not in by_key:
        ebx, ecx, edx = _signature_regs(KVM_SIGNATURE)
        result.append(CpuidEntry(HYPERVISOR_BASE, 0, HYPERVISOR_BASE, ebx, ecx, edx))

    result.sort(key=lambda e: (e.function, e.index))
    return result


def portable_cpuid(supported: list[CpuidEntry], backend: str, vcpu_count: int) -> list[CpuidEntry]:
    """``machine.cpu = "portable"``: only the features every backend of this host can run.

    The backend's table intersected with the interpreter's (what accel/fallback/policy.py
    does for the fallback) and, when KVM is usable here, with KVM's; features of an
    in-hypervisor LAPIC (x2APIC, TSC-deadline) are dropped, because pyvmm's userspace
    LAPIC has neither. A snapshot of such a guest restores on any of those backends.
    """
    from pyvmm import accel
    from pyvmm.accel.fallback.policy import fallback_cpuid

    table = fallback_cpuid(supported, vcpu_count=vcpu_count)
    if backend != "kvm" and accel.probe("kvm").usable:
        from pyvmm.accel import kvm

        with kvm.KvmVm() as other:
            table = fallback_cpuid(table, other.supported_cpuid(), vcpu_count=vcpu_count)
    out = []
    for entry in table:
        if entry.function == 1:
            entry = replace(entry, ecx=entry.ecx & ~((1 << 21) | ECX_TSC_DEADLINE))
        out.append(entry)
    return out
