"""What a guest may be offered when the interpreter may have to step its instructions.

``fallback_cpuid`` keeps from the hypervisor's CPUID only features the interpreter
also executes. ``pvm_kernel_cmdline`` covers the PVM host, where a guest's CPUID
cannot be filtered at all. Nothing here imports the interpreter: a KVM boot with
the fallback armed pays for unicorn only when an instruction is first stepped.
"""

from __future__ import annotations

import logging
import mmap
import struct
from dataclasses import replace

from pyvmm.accel.x86 import XSTATE_X87_SSE, CpuidEntry

log = logging.getLogger("pyvmm.fallback")

XSAVE_LEGACY_SIZE = 512
LEAF1_ECX_FROM_HYPERVISOR = (1 << 21) | (1 << 24) | (1 << 27) | (1 << 31)  # x2APIC, TSC-deadline, OSXSAVE, hypervisor
LEAF1_ECX_CX16 = 1 << 13

#: The feature leaves of the interpreter's CPUID (``accel.interp.cpuid.supported_cpuid`` on
#: unicorn 2.1.4: its Broadwell model as TCG runs it, trimmed, plus TSC-deadline), as a table so that the fallback
#: policy needs no engine; tests/unit/test_fallback_policy.py checks it against the engine.
INTERP_FEATURES = (
    CpuidEntry(0x1, 0, 0x000306D2, 0x00000800, 0xC7D82203, 0x078BFBFD),
    CpuidEntry(0x7, 0, 0x0, 0x0018038B, 0x0, 0x0, indexed=True),
    CpuidEntry(0xD, 0, 0x3, 0x240, 0x240, 0x0, indexed=True),
    CpuidEntry(0xD, 1, 0x1, 0x0, 0x0, 0x0, indexed=True),
    CpuidEntry(0x80000001, 0, 0x000306D2, 0x0, 0x21, 0x28100800),
)
FEATURE_LEAVES = frozenset((e.function, e.index) for e in INTERP_FEATURES)


def _xstate_size(mask: int) -> int:
    # x87/SSE live in the 512-byte legacy area, then the 64-byte header; the interpreter has nothing more
    return XSAVE_LEGACY_SIZE + 64 if mask else 0


def fallback_cpuid(supported: list[CpuidEntry], interp: list[CpuidEntry] = INTERP_FEATURES, *,
                   vcpu_count: int = 1) -> list[CpuidEntry]:  # fmt: skip
    """The hypervisor's supported CPUID with only the features the interpreter can also execute.

    Feature-flag registers (leaves 1, 7, 0xD and 0x80000001) are intersected;
    everything else (vendor, family, caches, topology, TSC, address sizes, the
    hypervisor's own leaves) stays the hypervisor's. Features of devices the
    hypervisor keeps serving itself (x2APIC, TSC-deadline: its in-kernel LAPIC)
    stay. XSAVE is limited to the x87/SSE state the interpreter saves and
    restores. With more than one vCPU CMPXCHG16B is dropped: a stepped
    ``lock cmpxchg16b`` would not be atomic against the other vCPUs.
    """
    theirs = {(e.function, e.index): e for e in interp}
    out = []
    xstate = XSTATE_X87_SSE
    for entry in supported:
        key = (entry.function, entry.index)
        other = theirs.get(key)
        fn = entry.function
        if fn == 1:
            other = other or CpuidEntry(1, 0, 0, 0, 0, 0)
            ecx = (entry.ecx & other.ecx) | (entry.ecx & LEAF1_ECX_FROM_HYPERVISOR)
            if vcpu_count > 1:
                ecx &= ~LEAF1_ECX_CX16
            entry = replace(entry, ecx=ecx, edx=entry.edx & other.edx)
        elif fn == 7:
            if other is None:
                entry = replace(entry, eax=0, ebx=0, ecx=0, edx=0)
            else:
                entry = replace(entry, eax=min(entry.eax, other.eax) if entry.index == 0 else entry.eax & other.eax,
                                ebx=entry.ebx & other.ebx, ecx=entry.ecx & other.ecx, edx=entry.edx & other.edx)
        elif fn == 0xD:
            if entry.index == 0:
                xstate = entry.eax & (other.eax if other else 0) & XSTATE_X87_SSE
                size = _xstate_size(xstate)
                entry = replace(entry, eax=xstate, ebx=size, ecx=size, edx=0)
            elif entry.index == 1:
                entry = replace(entry, eax=entry.eax & (other.eax if other else 0), ebx=0, ecx=0, edx=0)
            elif not xstate & (1 << entry.index):
                continue
        elif fn == 0x80000001:
            other = other or CpuidEntry(fn, 0, 0, 0, 0, 0)
            entry = replace(entry, ecx=entry.ecx & other.ecx, edx=entry.edx & other.edx)
        out.append(entry)
    return out


#: Linux's feature numbers (word * 32 + bit) for ``clearcpuid=``: CPUID.1:ECX is word 4
X86_FEATURE_SSSE3 = 4 * 32 + 9
X86_FEATURE_CX16 = 4 * 32 + 13
X86_FEATURE_POPCNT = 4 * 32 + 23
X86_FEATURE_SMAP = 9 * 32 + 20  # word 9: CPUID.7.0:EBX


def is_linux_kernel(path) -> bool:
    """A Linux bzImage (its setup header's version string is a release: "6.1.0-...") or an ELF
    vmlinux carrying Linux's version banner; other guests (pyvmm's test guests) are not."""
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as image:
            if image[0x202:0x206] == b"HdrS":
                version = struct.unpack_from("<H", image, 0x20E)[0]
                return bool(version) and image[0x200 + version : 0x201 + version].isdigit()
            return image[:4] == b"\x7fELF" and image.find(b"Linux version ") >= 0
    except (OSError, ValueError, struct.error):
        return False


def pvm_kernel_cmdline(cmdline: str, kernel=None, *, pvm: bool | None = None) -> str:
    """``cmdline`` plus the options a Linux guest needs on a PVM host with the fallback on.

    Measured here: a PVM guest's CPUID is the host's, whatever KVM_SET_CPUID2 says
    (leaf 1 ECX 0xfff83203 and XCR0 features 0xe7 against a table without XSAVE), so
    ``fallback_cpuid`` cannot hide features from it. Linux would then use XSAVES/XRSTOR
    with AVX state, which KVM's emulator fails on and the interpreter cannot step
    (no AVX, no XSAVES): ``noxsave`` makes it use FXSAVE/FXRSTOR and drop AVX.
    The rest are cleared from the kernel's view (``clearcpuid``) because stepping them
    costs more than the code Linux patches in without them. Measured in the first
    5 minutes of Debian's 6.1 boot here: 175,618 fallbacks (418 us each, 73 s): 59k
    ``clac`` (SMAP: without it the user-access markers stay NOPs), 51k per-CPU
    ``cmpxchg16b`` (CX16: without it SLUB's fast path calls this_cpu_cmpxchg16b_emu),
    ~60k SSE steps of the blake2s/chacha SSSE3 self-tests (~0.7 ms each, soft-lockup
    warnings; without SSSE3 the generic C code runs), 768 ``popcnt`` (hweight falls
    back to its C version). Without CX16 a stepped ``lock cmpxchg16b`` (not atomic
    against other vCPUs KVM runs meanwhile) is also never needed with several vCPUs.
    The fallback still handles whatever else fails (int3, SSE2, ldmxcsr, ...).
    Nothing is added on other hosts (``pvm`` False; None asks the KVM backend), when
    ``kernel`` (its path) is not Linux, or (for ``clearcpuid``) when the command line
    has its own.
    """
    if pvm is None:
        from pyvmm.accel import kvm

        pvm = kvm.is_pvm_host()
    if not pvm or (kernel is not None and not is_linux_kernel(kernel)):
        return cmdline
    words = cmdline.split()
    extra = [] if "noxsave" in words else ["noxsave"]
    if not any(word.startswith("clearcpuid=") for word in words):
        features = (X86_FEATURE_SSSE3, X86_FEATURE_CX16, X86_FEATURE_POPCNT, X86_FEATURE_SMAP)
        extra.append("clearcpuid=" + ",".join(map(str, features)))
    if extra:
        log.info("PVM host: kernel command line += %s (its CPUID cannot be filtered; see accel/fallback/policy.py)",
                 " ".join(extra))  # fmt: skip
    return " ".join([cmdline, *extra]) if extra else cmdline


def interp_supported_cpuid() -> list[CpuidEntry]:
    """The interpreter's whole ``supported_cpuid`` (creates a scratch engine: imports unicorn)."""
    from pyvmm.accel.interp.cpuid import supported_cpuid
    from pyvmm.accel.irqchip.lapic import LAPIC_TIMER_HZ

    return supported_cpuid(LAPIC_TIMER_HZ)
