"""The fallback manager: instructions KVM's emulator cannot execute are stepped by the interpreter.

On a PVM host KVM emulates all guest kernel-mode code, and its emulator does not
know some instructions Linux uses (``cmpxchg16b``, ``xrstor``, ``int3``,
``popcnt`` ...): KVM_RUN then returns an emulation failure (accel/kvm.py turns
it into ``EmulationFailure``). ``FallbackManager`` is the run loop's
``fallback`` callback for such exits. It

1. reads the KVM vCPU's state (registers, segment caches, control registers,
   pending events; and the FPU/SSE/XSAVE state, XCR0 and the MSRs unless the
   instruction is one of the few known to touch none of them),
2. loads it into a ``Stepper``: a unicorn engine of its own, kept per KVM vCPU,
   mapping the *same* guest RAM, with every other guest-physical address and
   every port forwarded synchronously to the VMM's buses,
3. executes exactly that one instruction (``emu_start(count=1)``), delivering
   an exception it raises through the guest IDT (``int3`` resumes at the #BP
   handler's first instruction, a #PF at the #PF handler's),
4. writes back to KVM only what the instruction changed.

Why a separate engine rather than an ``InterpVcpu``: the interpreter vCPU runs
its engine on a thread with an exit handoff and makes async stops land only
between translation blocks, so it cannot stop after one instruction; here the
I/O of the step is served right inside the hook, on the vCPU's own thread, and
the state helpers of the interpreter (``interp/context.py``: segment caches,
hflags, the verified context offsets; ``interp/system.py``: IDT delivery,
syscall, page walks) are reused as they are.

The stepper never owns interrupts: KVM's in-kernel irqchip does. It injects
nothing, and an access to the LAPIC/IOAPIC pages or to the ports of KVM's
in-kernel PIC/PIT cannot be served by it (those devices live in the kernel):
the step ends with a clear error naming the RIP and the address.

LOCK-prefixed instructions stepped here are not atomic against other vCPUs that
KVM runs at the same time (unicorn emulates them as plain read-modify-write);
``fallback_cpuid`` therefore hides CMPXCHG16B from guests with more than one vCPU
(and on PVM, where CPUID cannot be filtered, ``pvm_kernel_cmdline`` clears it).

Cost per fallback, measured here (PVM host, Python 3.11, one idle core): ~220 us
for an instruction that touches only GPRs/flags/memory (popcnt, cmpxchg16b, int3,
clac): KVM get_regs/get_sregs/get_vcpu_events ~70 us, loading the engine ~70 us,
two state snapshots ~30 us, the step ~18 us, set_regs ~15 us; ~520 us for an SSE
instruction (the FPU/SSE registers are moved both ways through unicorn's register
API, ~85 us per direction). ``summary()`` reports the measured mean per instruction.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import threading
import time
from dataclasses import dataclass, replace

from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_INSN_INVALID,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_MODE_64,
    UC_PROT_ALL,
    Uc,
    UcError,
)
from unicorn import x86_const as x86

from pyvmm.accel.interp import context as ctx
from pyvmm.accel.interp import system
from pyvmm.accel.interp.cpuid import CpuidTable
from pyvmm.accel.interp.vcpu import cache_to_segment, segment_to_cache
from pyvmm.accel.ops import GPR_NAMES, CpuidEntry, EmulationFailure, FpuState, Regs, SpecialRegs
from pyvmm.errors import AccelError, GuestError
from pyvmm.vmm.layout import IOAPIC_BASE
from pyvmm.vmm.layout import LAPIC_BASE as LAPIC_DEFAULT
from pyvmm.vmm.x86.msrs import MSR_EFER
from pyvmm.vmm.x86.msrs import MSR_IA32_TSC as MSR_TSC

log = logging.getLogger("pyvmm.fallback")

PHYS_ADDR_LIMIT = 1 << 40
NEVER = 1 << 63
#: XCR0 components the interpreter's XSAVE/XRSTOR implement: x87 and SSE
INTERP_XSTATE = 0x3
XSAVE_LEGACY_SIZE = 512
XSTATE_BV_OFFSET = 512

PAGE = 0x1000
#: ports served by KVM's in-kernel PIC, PIT (with its speaker port) and ELCR
KVM_IRQCHIP_PORTS = frozenset([0x20, 0x21, 0xA0, 0xA1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x4D0, 0x4D1])

KVM_X86_SHADOW_INT_MOV_SS = 1
KVM_X86_SHADOW_INT_STI = 2

#: MSRs moved with the full state (FS/GS base travel in the segment caches, EFER in sregs)
TRANSFER_MSRS = (
    0x174, 0x175, 0x176,  # SYSENTER_CS/ESP/EIP
    0x1A0,  # MISC_ENABLE
    0x277,  # PAT
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,  # STAR LSTAR CSTAR FMASK
    0xC0000102,  # KERNEL_GS_BASE
    0xC0000103,  # TSC_AUX
)  # fmt: skip

#: Instructions whose effects are limited to GPRs, RFLAGS, RIP, memory and (through an
#: exception they raise) the segment/stack state: their steps skip the FPU, XCR0 and MSRs.
INTEGER_ONLY = frozenset(
    """popcnt lzcnt tzcnt cmpxchg16b cmpxchg8b cmpxchg xadd xchg int3 int1 int into movbe bsf bsr
    bt bts btr btc add sub adc sbb and or xor not neg inc dec mov movzx movsx movsxd cmp test
    andn bextr blsi blsmsk blsr bzhi pdep pext rorx sarx shlx shrx adcx adox crc32 clac stac""".split()
)
#: Instructions that read or write the transferred MSRs (explicitly, or as syscall/swapgs/rdtsc
#: do): only their steps move the MSRs (an SSE instruction's step does not).
MSR_USERS = frozenset(
    "rdmsr wrmsr syscall sysret sysretq sysenter sysexit swapgs rdtsc rdtscp rdpid".split()
)
#: mnemonics that load or store the extended state as a whole
XSAVE_FAMILY = frozenset("xsave xsave64 xsaveopt xsaveopt64 xsavec xsavec64 xsaves xsaves64 xrstor xrstor64 xrstors xrstors64".split())

_GPR_IDS = (
    x86.UC_X86_REG_RAX, x86.UC_X86_REG_RBX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX,
    x86.UC_X86_REG_RSI, x86.UC_X86_REG_RDI, x86.UC_X86_REG_RSP, x86.UC_X86_REG_RBP,
    x86.UC_X86_REG_R8, x86.UC_X86_REG_R9, x86.UC_X86_REG_R10, x86.UC_X86_REG_R11,
    x86.UC_X86_REG_R12, x86.UC_X86_REG_R13, x86.UC_X86_REG_R14, x86.UC_X86_REG_R15,
    x86.UC_X86_REG_RIP, x86.UC_X86_REG_RFLAGS,
)  # fmt: skip
_GPR_FIELDS = tuple(Regs.__dataclass_fields__)
_U64 = (1 << 64) - 1
# QEMU's CPUX86State in the context blob: regs[16] in its own order, then eip (verified at start-up)
GPRS_OFFSET = 40
RIP_OFFSET = GPRS_OFFSET + 16 * 8
_QEMU_GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                   "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # fmt: skip
_STATE_FORMAT = "<17Q"
_FXSAVE_HEAD = struct.Struct("<HHBxHQQI")  # fcw fsw ftw(abridged) fop fip fdp mxcsr


class StepRefused(Exception):
    """The step cannot be completed by the interpreter (a device KVM owns, an unknown instruction)."""


# --------------------------------------------------------------------------
# CPUID for a KVM guest that may be stepped by the interpreter

LEAF1_ECX_FROM_KVM = (1 << 21) | (1 << 24) | (1 << 27) | (1 << 31)  # x2APIC, TSC-deadline (KVM's LAPIC), OSXSAVE, hypervisor
LEAF1_ECX_CX16 = 1 << 13


def _xstate_size(mask: int) -> int:
    # x87/SSE live in the 512-byte legacy area, then the 64-byte header; the interpreter has nothing more
    return XSAVE_LEGACY_SIZE + 64 if mask else 0


def fallback_cpuid(kvm: list[CpuidEntry], interp: list[CpuidEntry], *, vcpu_count: int = 1) -> list[CpuidEntry]:
    """KVM's supported CPUID with only the features the interpreter can also execute.

    Feature-flag registers (leaves 1, 7, 0xD and 0x80000001) are intersected;
    everything else (vendor, family, caches, topology, TSC, address sizes,
    KVM's own leaves) stays KVM's. Features of devices KVM keeps serving itself
    (x2APIC, TSC-deadline: its in-kernel LAPIC) stay. XSAVE is limited to the
    x87/SSE state the interpreter can save and restore. With more than one vCPU
    CMPXCHG16B is dropped: a stepped ``lock cmpxchg16b`` would not be atomic
    against the other vCPUs.
    """
    theirs = {(e.function, e.index): e for e in interp}
    out = []
    xstate = INTERP_XSTATE
    for entry in kvm:
        key = (entry.function, entry.index)
        other = theirs.get(key)
        fn = entry.function
        if fn == 1:
            other = other or CpuidEntry(1, 0, 0, 0, 0, 0)
            ecx = (entry.ecx & other.ecx) | (entry.ecx & LEAF1_ECX_FROM_KVM)
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
                xstate = entry.eax & (other.eax if other else 0) & INTERP_XSTATE
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
    import mmap

    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as image:
            if image[0x202:0x206] == b"HdrS":
                version = struct.unpack_from("<H", image, 0x20E)[0]
                return bool(version) and image[0x200 + version : 0x201 + version].isdigit()
            return image[:4] == b"\x7fELF" and image.find(b"Linux version ") >= 0
    except (OSError, ValueError, struct.error):
        return False


def pvm_kernel_cmdline(cmdline: str, kernel=None) -> str:
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
    Nothing is added on other hosts, when ``kernel`` (its path) is not Linux, or
    (for ``clearcpuid``) when the command line has its own.
    """
    from pyvmm.accel import kvm

    if not kvm.is_pvm_host() or (kernel is not None and not is_linux_kernel(kernel)):
        return cmdline
    words = cmdline.split()
    extra = [] if "noxsave" in words else ["noxsave"]
    if not any(word.startswith("clearcpuid=") for word in words):
        features = (X86_FEATURE_SSSE3, X86_FEATURE_CX16, X86_FEATURE_POPCNT, X86_FEATURE_SMAP)
        extra.append("clearcpuid=" + ",".join(map(str, features)))
    if extra:
        log.info("PVM host: kernel command line += %s (its CPUID cannot be filtered; see accel/fallback.py)",
                 " ".join(extra))  # fmt: skip
    return " ".join([cmdline, *extra]) if extra else cmdline


def interp_supported_cpuid() -> list[CpuidEntry]:
    """The interpreter's ``supported_cpuid`` without creating an interpreter VM."""
    from pyvmm.accel.interp.cpuid import supported_cpuid
    from pyvmm.accel.irqchip.lapic import LAPIC_TIMER_HZ

    return supported_cpuid(LAPIC_TIMER_HZ)


# --------------------------------------------------------------------------
# unicorn: XCR0 in the saved context (not in the register API), verified once

_xcr0_offset: int | None = None
_verify_lock = threading.Lock()


def _verify_engine() -> int:
    """Run the interpreter's layout checks and find XCR0 in the context blob; returns its offset."""
    global _xcr0_offset
    with _verify_lock:
        if _xcr0_offset is None:
            ctx.verify_layout()
            _xcr0_offset = _find_xcr0_offset()
    return _xcr0_offset


def _verify_register_offsets(uc) -> None:
    """GPRs, RIP and CR0..CR4 are where ``load``/``snapshot`` patch and read them."""
    values = {name: 0x1111111111110000 + i for i, name in enumerate(_QEMU_GPR_ORDER)}
    uc.reg_write_batch(tuple((_GPR_IDS[_GPR_FIELDS.index(n)], v) for n, v in values.items()))
    uc.reg_write(x86.UC_X86_REG_RIP, 0x2222)
    uc.reg_write(x86.UC_X86_REG_CR2, 0x3333)
    blob = ctx.Blob(uc)
    raw = blob.read(_STATE_FORMAT, GPRS_OFFSET)
    crs = blob.read("<QQQQQ", ctx.CR0)
    expected_crs = (uc.reg_read(x86.UC_X86_REG_CR0), 0, 0x3333, uc.reg_read(x86.UC_X86_REG_CR3),
                    uc.reg_read(x86.UC_X86_REG_CR4))  # fmt: skip
    if raw != tuple(values.values()) + (0x2222,) or crs != expected_crs:
        raise AccelError("interp", "unicorn version/layout not supported: GPR/RIP/CR offsets in the context differ")


def _find_xcr0_offset() -> int:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    page = ctypes.create_string_buffer(0x1000)
    uc.mem_map_ptr(0, 0x1000, UC_PROT_ALL, ctypes.addressof(page))
    uc.reg_write(x86.UC_X86_REG_CR4, uc.reg_read(x86.UC_X86_REG_CR4) | (1 << 18) | (1 << 9))
    page[0:4] = b"\x0f\x01\xd1\xf4"  # xsetbv; hlt
    page[0x10:0x14] = b"\x0f\x01\xd0\xf4"  # xgetbv; hlt

    def xsetbv(value: int) -> bytes:
        uc.reg_write_batch(((x86.UC_X86_REG_RAX, value), (x86.UC_X86_REG_RDX, 0), (x86.UC_X86_REG_RCX, 0)))
        uc.emu_start(0, NEVER)
        saved = uc.context_save()
        return ctypes.string_at(ctypes.cast(saved.context, ctypes.c_void_p).value, saved.size)

    _verify_register_offsets(uc)
    one, three = xsetbv(1), xsetbv(3)
    start = ctx.SEGMENTS  # past the GPRs (which hold the values written above)
    found = [off for off in range(start, len(one) - 8, 8)
             if struct.unpack_from("<Q", one, off)[0] == 1 and struct.unpack_from("<Q", three, off)[0] == 3]
    if len(found) != 1:
        raise AccelError("interp", f"unicorn version/layout not supported: XCR0 not found in the context ({found})")
    blob = ctx.Blob(uc)
    blob.write("<Q", found[0], 1)
    blob.restore()
    uc.reg_write(x86.UC_X86_REG_RCX, 0)
    uc.emu_start(0x10, NEVER)
    if uc.reg_read(x86.UC_X86_REG_RAX) != 1:
        raise AccelError("interp", "unicorn version/layout not supported: a patched XCR0 is not what xgetbv reads")
    return found[0]


# --------------------------------------------------------------------------
# the vCPU state that moves


@dataclass
class MovedState:
    """What is read from KVM for one step; ``full`` adds FPU/XSAVE and XCR0, ``msrs`` the MSRs."""

    regs: Regs
    sregs: SpecialRegs
    events: dict | None
    full: bool
    xsave: bytes | None = None
    fpu: FpuState | None = None
    xcr0: int | None = None
    msrs: dict | None = None


def fpu_from_fxsave(area: bytes) -> FpuState:
    fcw, fsw, ftw, fop, fip, fdp, mxcsr = _FXSAVE_HEAD.unpack_from(area, 0)
    return FpuState(
        fcw=fcw, fsw=fsw, ftwx=ftw, last_opcode=fop, last_ip=fip, last_dp=fdp, mxcsr=mxcsr,
        fpr=[bytes(area[32 + 16 * i : 48 + 16 * i]) for i in range(8)],
        xmm=[bytes(area[160 + 16 * i : 176 + 16 * i]) for i in range(16)],
    )  # fmt: skip


def fpu_into_xsave(area: bytes, fpu: FpuState) -> bytes:
    """``area`` with its legacy region replaced by ``fpu`` and x87/SSE marked as not in init state."""
    out = bytearray(area)
    _FXSAVE_HEAD.pack_into(out, 0, fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode, fpu.last_ip, fpu.last_dp, fpu.mxcsr)
    for i in range(8):
        out[32 + 16 * i : 48 + 16 * i] = bytes(fpu.fpr[i]).ljust(16, b"\0")[:16]
    for i in range(16):
        out[160 + 16 * i : 176 + 16 * i] = bytes(fpu.xmm[i]).ljust(16, b"\0")[:16]
    bv = struct.unpack_from("<Q", out, XSTATE_BV_OFFSET)[0]
    struct.pack_into("<Q", out, XSTATE_BV_OFFSET, bv | INTERP_XSTATE)
    return bytes(out)


# --------------------------------------------------------------------------
# the stepping engine


class Stepper(system.EngineHooks):
    """A unicorn engine that executes one instruction at a time on the VMM's guest memory and buses.

    Used from one thread (the vCPU's). ``cpuid`` is the vCPU's CPUID table
    (what the guest's CPUID sees if a stepped instruction is CPUID).
    """

    def __init__(self, index: int, memory, pio, mmio, cpuid: list[CpuidEntry]):
        self.index = index
        self._xcr0_offset = _verify_engine()
        self.pio, self.mmio = pio, mmio
        self.uc = uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self._exports = []
        self._cpuid = CpuidTable(list(cpuid)) if cpuid else None
        self.apic_base = LAPIC_DEFAULT
        self._pending = None
        self._refused: str | None = None
        self._system_loaded = None  # CR0/CR3/CR4/EFER/GDTR/IDTR as last written (None: unknown)
        ram = []
        for region in memory.regions:
            export = (ctypes.c_char * region.size).from_buffer(region.buffer)
            self._exports.append(export)
            uc.mem_map_ptr(region.guest_addr, region.size, UC_PROT_ALL, ctypes.addressof(export))
            ram.append((region.guest_addr, region.guest_addr + region.size))
        cursor = 0
        for start, end in sorted(ram) + [(PHYS_ADDR_LIMIT, PHYS_ADDR_LIMIT)]:
            if start > cursor:
                uc.mmio_map(cursor, start - cursor, self._mmio_read, cursor, self._mmio_write, cursor)
            cursor = max(cursor, end)
        uc.ctl_exits_enabled(True)  # "until" is ignored: count=1 alone ends the run
        uc.ctl_set_exits([])
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, x86.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, x86.UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._on_syscall, None, 1, 0, x86.UC_X86_INS_SYSCALL)
        uc.hook_add(UC_HOOK_INSN, self._on_sysenter, None, 1, 0, x86.UC_X86_INS_SYSENTER)
        uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, x86.UC_X86_INS_CPUID)

    def close(self) -> None:
        self.uc = None
        self._exports.clear()  # the engine is gone: guest memory may be unmapped now

    # ------------------------------------------------------------ hooks
    def _refuse(self, what: str) -> None:
        if self._refused is None:
            self._refused = what
        self.uc.emu_stop()  # checked after the access: the instruction is abandoned, not completed

    def _irqchip_page(self, addr: int) -> str | None:
        if (addr & ~(PAGE - 1)) == (self.apic_base & ~(PAGE - 1)):
            return "LAPIC"
        if (addr & ~(PAGE - 1)) == IOAPIC_BASE:
            return "IOAPIC"
        return None

    def _mmio_read(self, uc, offset, size, base):
        addr = base + offset
        owner = self._irqchip_page(addr)
        if owner is not None:
            self._refuse(f"a read of {owner} register {addr:#x} (KVM's in-kernel irqchip serves it, not the interpreter)")
            return 0
        data = bytearray(size)
        self.mmio.read(addr, memoryview(data))
        return int.from_bytes(data, "little")

    def _mmio_write(self, uc, offset, size, value, base):
        addr = base + offset
        owner = self._irqchip_page(addr)
        if owner is not None:
            self._refuse(f"a write of {owner} register {addr:#x} (KVM's in-kernel irqchip serves it, not the interpreter)")
            return
        self.mmio.write(addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def _on_in(self, uc, port, size, _):
        if port in KVM_IRQCHIP_PORTS:
            self._refuse(f"an in from port {port:#x} (KVM's in-kernel PIC/PIT serves it, not the interpreter)")
            return 0
        data = bytearray(size)
        self.pio.read(port, memoryview(data))
        return int.from_bytes(data, "little")

    def _on_out(self, uc, port, size, value, _):
        if port in KVM_IRQCHIP_PORTS:
            self._refuse(f"an out to port {port:#x} (KVM's in-kernel PIC/PIT serves it, not the interpreter)")
            return
        self.pio.write(port, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def _on_interrupt(self, uc, vector, _):
        self._pending = system.exception_record(uc, vector)
        uc.emu_stop()


    # ------------------------------------------------------------ state in
    def load(self, state: MovedState) -> None:
        """Put ``state`` into the engine: one context patch, plus the register API only for what needs it."""
        uc = self.uc
        sregs, regs = state.sregs, state.regs
        self.apic_base = sregs.apic_base or LAPIC_DEFAULT
        # CR0/CR3/CR4/EFER/GDTR/IDTR through the engine's own helpers (they keep its mode bits
        # and TLB right), and only when they differ from what the engine holds already.
        system_regs = (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, sregs.gdt.base, sregs.gdt.limit,
                       sregs.idt.base, sregs.idt.limit)  # fmt: skip
        if system_regs != self._system_loaded:
            uc.reg_write(x86.UC_X86_REG_CR3, sregs.cr3)
            uc.reg_write(x86.UC_X86_REG_CR4, sregs.cr4)
            uc.reg_write(x86.UC_X86_REG_CR0, sregs.cr0)
            uc.reg_write(x86.UC_X86_REG_MSR, (MSR_EFER, sregs.efer))
            uc.reg_write(x86.UC_X86_REG_GDTR, (0, sregs.gdt.base, sregs.gdt.limit, 0))
            uc.reg_write(x86.UC_X86_REG_IDTR, (0, sregs.idt.base, sregs.idt.limit, 0))
            self._system_loaded = system_regs
        if state.full:
            self._load_fpu(state.fpu)
            for msr, value in (state.msrs or {}).items():
                if msr != MSR_TSC:
                    uc.reg_write(x86.UC_X86_REG_MSR, (msr, value))
        blob = ctx.Blob(uc)
        gprs = struct.pack("<16Q", *(getattr(regs, name) & _U64 for name in _QEMU_GPR_ORDER))
        blob.write("<128s", GPRS_OFFSET, gprs)
        blob.write("<Q", RIP_OFFSET, regs.rip)
        blob.write("<Q", ctx.CR0 + 16, sregs.cr2)
        caches = [segment_to_cache(getattr(sregs, name)) for name in ctx.SEGMENT_NAMES]
        for i, cache in enumerate(caches):
            blob.set_segment(i, *cache)
        blob.write("<Q", ctx.EFER, sregs.efer)
        bases = caches[ctx.DS][1] | caches[ctx.ES][1] | caches[ctx.SS][1]
        hflags = ctx.compute_hflags(blob.hflags, sregs.cr0, sregs.efer, caches[ctx.CS][3], caches[ctx.SS][3],
                                    bases != 0, bool(regs.rflags & system.VM))  # fmt: skip
        if state.events and state.events["interrupt"]["shadow"]:
            hflags |= ctx.HF_INHIBIT_IRQ
        blob.hflags = hflags
        blob.write("<i", ctx.OLD_EXCEPTION, -1)
        if state.full:
            blob.write("<Q", self._xcr0_offset, state.xcr0)
            if state.msrs and MSR_TSC in state.msrs:
                from pyvmm.accel.interp.vcpu import _host_tsc

                blob.write("<Q", ctx.TSC_OFFSET, (state.msrs[MSR_TSC] - _host_tsc()) & _U64)
        blob.restore()
        uc.reg_write(x86.UC_X86_REG_RFLAGS, regs.rflags)  # the engine keeps flags in lazy form
        # The guest may have rewritten code and page tables while KVM ran it.
        uc.ctl_flush_tb()
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def _load_fpu(self, fpu: FpuState) -> None:
        uc = self.uc
        top = (fpu.fsw >> 11) & 7
        tag = 0
        for i in range(8):
            if not fpu.ftwx & (1 << i):
                tag |= 3 << (2 * i)
        writes = [(x86.UC_X86_REG_FPCW, fpu.fcw), (x86.UC_X86_REG_FPSW, fpu.fsw), (x86.UC_X86_REG_FPTAG, tag),
                  (x86.UC_X86_REG_FOP, fpu.last_opcode), (x86.UC_X86_REG_FIP, fpu.last_ip),
                  (x86.UC_X86_REG_FDP, fpu.last_dp), (x86.UC_X86_REG_MXCSR, fpu.mxcsr)]
        for i in range(8):
            raw = bytes(fpu.fpr[i]).ljust(10, b"\0")
            writes.append((x86.UC_X86_REG_FP0 + ((top + i) & 7),
                           (int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:10], "little"))))
        for i in range(16):
            writes.append((x86.UC_X86_REG_XMM0 + i, int.from_bytes(bytes(fpu.xmm[i]).ljust(16, b"\0"), "little")))
        for reg, value in writes:
            uc.reg_write(reg, value)

    # ------------------------------------------------------------ state out
    def snapshot(self, full: bool, msrs: bool = False) -> dict:
        """The engine state a step can change, for before/after comparison (one context save)."""
        uc = self.uc
        blob = ctx.Blob(uc)
        raw = blob.read(_STATE_FORMAT, GPRS_OFFSET)
        qemu_gprs, rip = raw[:16], raw[16]
        by_name = dict(zip(_QEMU_GPR_ORDER, qemu_gprs))
        snap = {
            "gprs": tuple(by_name[name] for name in GPR_NAMES) + (rip, uc.reg_read(x86.UC_X86_REG_RFLAGS)),
            "segments": tuple(blob.segment(i) for i in range(8)),
            "crs": blob.read("<QQQQQ", ctx.CR0),  # CR0..CR4
            "gdt": blob.segment(8)[1:3],
            "idt": blob.segment(9)[1:3],
            "efer": blob.read("<Q", ctx.EFER)[0],
            "shadow": bool(blob.hflags & ctx.HF_INHIBIT_IRQ),
        }
        if full:
            snap["fpu"] = self._read_fpu()
            snap["xcr0"] = blob.read("<Q", self._xcr0_offset)[0]
        if msrs:
            snap["msrs"] = {msr: uc.reg_read(x86.UC_X86_REG_MSR, msr) for msr in TRANSFER_MSRS}
        return snap

    def _read_fpu(self) -> FpuState:
        uc = self.uc
        fsw = uc.reg_read(x86.UC_X86_REG_FPSW)
        top = (fsw >> 11) & 7
        tag = uc.reg_read(x86.UC_X86_REG_FPTAG)
        physical = []
        for i in range(8):
            mantissa, exponent = uc.reg_read(x86.UC_X86_REG_FP0 + i)
            physical.append(mantissa.to_bytes(8, "little") + exponent.to_bytes(2, "little") + bytes(6))
        ftwx = sum(1 << i for i in range(8) if (tag >> (2 * i)) & 3 != 3)
        return FpuState(
            fcw=uc.reg_read(x86.UC_X86_REG_FPCW), fsw=fsw, ftwx=ftwx, last_opcode=uc.reg_read(x86.UC_X86_REG_FOP),
            last_ip=uc.reg_read(x86.UC_X86_REG_FIP), last_dp=uc.reg_read(x86.UC_X86_REG_FDP),
            fpr=[physical[(top + i) & 7] for i in range(8)],
            xmm=[uc.reg_read(x86.UC_X86_REG_XMM0 + i).to_bytes(16, "little") for i in range(16)],
            mxcsr=uc.reg_read(x86.UC_X86_REG_MXCSR),
        )  # fmt: skip

    # ------------------------------------------------------------ the step
    def _set_ac(self, rip: int, length: int, value: bool) -> str | None:
        """``clac``/``stac``: #UD unless CPL 0 with CR4.SMAP, else RFLAGS.AC = value."""
        uc = self.uc
        cpl = ctx.Blob(uc).hflags & ctx.HF_CPL_MASK
        if cpl or not uc.reg_read(x86.UC_X86_REG_CR4) & (1 << 21):
            system.deliver(uc, system.UD)
            return f"exception {system.UD}"
        rflags = uc.reg_read(x86.UC_X86_REG_RFLAGS)
        uc.reg_write(x86.UC_X86_REG_RFLAGS, (rflags | system.AC) if value else (rflags & ~system.AC))
        uc.reg_write(x86.UC_X86_REG_RIP, rip + length)
        return None

    def deliver_event(self, events: dict) -> str | None:
        """Deliver an event KVM was injecting (it comes before the instruction); returns what it was."""
        exc, irq, nmi = events["exception"], events["interrupt"], events["nmi"]
        try:
            if exc["injected"] or exc["pending"]:
                code = exc["error_code"] if exc["has_error_code"] else None
                system.deliver(self.uc, exc["nr"], error_code=code)
                return f"exception {exc['nr']}"
            if nmi["injected"]:
                system.deliver(self.uc, system.NMI, external=True)
                return "NMI"
            if irq["injected"]:
                system.deliver(self.uc, irq["nr"], software=bool(irq["soft"]), external=not irq["soft"])
                return f"interrupt {irq['nr']}"
        except system.TripleFault as err:
            raise StepRefused(f"triple fault while delivering an injected event ({err})") from err
        except system.Unsupported as err:
            raise StepRefused(str(err)) from err
        return None

    def step(self, rip: int, mnemonic: str = "", length: int = 0) -> str | None:
        """Execute the instruction at ``rip``; returns the exception it raised (delivered), if any.

        ``mnemonic``/``length`` (from the decoder) let the few instructions unicorn
        lacks but whose effect is one flag (``clac``/``stac``, SMAP) be done here.
        """
        uc = self.uc
        self._pending = None
        self._refused = None
        if mnemonic in ("clac", "stac") and length:
            return self._set_ac(rip, length, mnemonic == "stac")
        error = None
        try:
            uc.emu_start(rip, NEVER, count=1)
        except UcError as err:
            error = err
        if self._refused is not None:
            raise StepRefused(self._refused)
        pending = self._pending
        try:
            if pending is not None:
                kind = pending[0]
                if kind == "exception":
                    _, vector, error_code, software, cr2 = pending
                    if vector == system.UD and mnemonic not in ("ud0", "ud1", "ud2"):
                        # KVM's emulator injects #UD itself for opcodes the CPU lacks, so this one
                        # is valid for the guest's CPU: the interpreter lacks it (AVX, ...)
                        raise StepRefused("the interpreter does not implement this instruction (it raised #UD)")
                    system.deliver(uc, vector, error_code=error_code, software=software, cr2=cr2)
                    return f"exception {vector}"
                if kind == "syscall":
                    system.do_syscall(uc, uc.reg_read(x86.UC_X86_REG_RIP))
                else:
                    system.do_sysenter(uc, uc.reg_read(x86.UC_X86_REG_RIP))
                return None
            if error is not None:
                if error.errno == UC_ERR_INSN_INVALID:
                    if mnemonic in ("ud0", "ud1", "ud2"):
                        system.deliver(uc, system.UD)
                        return f"exception {system.UD}"
                    raise StepRefused("the interpreter does not implement this instruction")
                raise StepRefused(f"unicorn: {error}")
        except system.Fault as fault:
            system.deliver(uc, fault.vector, error_code=fault.error_code, cr2=fault.cr2)
            return f"exception {fault.vector}"
        except system.TripleFault as err:
            raise StepRefused(f"triple fault while delivering an exception ({err})") from err
        except system.Unsupported as err:
            raise StepRefused(str(err)) from err
        return None


# --------------------------------------------------------------------------
# the manager


@dataclass
class InsnStats:
    text: str  # mnemonic and operands (capstone), or "(undecodable)"
    mnemonic: str
    count: int = 0
    seconds: float = 0.0


class FallbackManager:
    """The ``VcpuLoop`` fallback: ``manager(vcpu, exit)`` steps the failing instruction in the interpreter.

    ``memory``/``pio``/``mmio`` are the VMM's guest memory and buses (the
    stepper forwards the instruction's I/O to them). ``set_cpuid(index, entries)``
    gives a vCPU's CPUID table for a stepped CPUID. Counts are kept per
    instruction bytes (``counts()``, ``summary()``); each instruction is logged
    at INFO the first time it is seen.
    """

    def __init__(self, memory, pio, mmio):
        self.memory, self.pio, self.mmio = memory, pio, mmio
        self._steppers: dict[int, Stepper] = {}
        self._cpuid: dict[int, list[CpuidEntry]] = {}
        self._stats: dict[bytes, InsnStats] = {}
        self._decoded: dict[tuple[bytes, int], tuple[bytes, str, str]] = {}
        self._lock = threading.Lock()
        self._msr_list: dict[int, tuple[int, ...]] = {}
        self._disasm = {}
        self.total = 0
        self.seconds = 0.0

    def set_cpuid(self, index: int, entries: list[CpuidEntry]) -> None:
        self._cpuid[index] = list(entries)

    def stepper(self, index: int) -> Stepper:
        stepper = self._steppers.get(index)
        if stepper is None:
            stepper = self._steppers[index] = Stepper(index, self.memory, self.pio, self.mmio, self._cpuid.get(index, []))
        return stepper

    # ------------------------------------------------------------ decoding
    def _decode(self, window: bytes, bits: int) -> tuple[bytes, str, str]:
        """(instruction bytes, mnemonic, text) of the first instruction in ``window``."""
        key = (window, bits)
        hit = self._decoded.get(key)
        if hit is None:
            import capstone

            cs = self._disasm.get(bits)
            if cs is None:
                mode = {64: capstone.CS_MODE_64, 32: capstone.CS_MODE_32, 16: capstone.CS_MODE_16}[bits]
                cs = self._disasm[bits] = capstone.Cs(capstone.CS_ARCH_X86, mode)
            insn = next(cs.disasm(window, 0, 1), None)
            if insn is None:
                hit = (window, "", "(undecodable)")
            else:
                text = f"{insn.mnemonic} {insn.op_str}".strip()
                hit = (bytes(window[: insn.size]), insn.mnemonic.split()[-1], text)
            if len(self._decoded) > 4096:
                self._decoded.clear()
            self._decoded[key] = hit
        return hit

    @staticmethod
    def _code_bits(sregs: SpecialRegs) -> int:
        if sregs.efer & 0x400 and sregs.cs.l:
            return 64
        return 32 if sregs.cs.db and sregs.cr0 & 1 else 16

    # ------------------------------------------------------------ state transfer
    def _msrs_of(self, vcpu) -> tuple[int, ...]:
        """The transferable MSRs this KVM vCPU can read (found once per vCPU)."""
        listed = self._msr_list.get(vcpu.index)
        if listed is None:
            readable = []
            for msr in (MSR_TSC, *TRANSFER_MSRS):
                try:
                    vcpu.get_msrs([msr])
                    readable.append(msr)
                except AccelError:
                    pass
            listed = self._msr_list[vcpu.index] = tuple(readable)
        return listed

    def read_state(self, vcpu, full: bool, sregs: SpecialRegs | None = None, msrs: bool = False) -> MovedState:
        events = vcpu.get_vcpu_events() if hasattr(vcpu, "get_vcpu_events") else None
        state = MovedState(vcpu.get_regs(), sregs or vcpu.get_sregs(), events, full)
        if full:
            if hasattr(vcpu, "get_xsave"):
                state.xsave = vcpu.get_xsave()
                state.fpu = fpu_from_fxsave(state.xsave)
            else:
                state.fpu = vcpu.get_fpu()
            state.xcr0 = vcpu.get_xcrs().get(0, 1) if hasattr(vcpu, "get_xcrs") else 1
            if msrs:
                state.msrs = vcpu.get_msrs(list(self._msrs_of(vcpu)))
        return state

    def write_back(self, vcpu, state: MovedState, before: dict, after: dict, mnemonic: str,
                   events_changed: bool) -> None:  # fmt: skip
        """Give KVM what the step changed."""
        regs = Regs(**dict(zip(_GPR_FIELDS, after["gprs"])))
        vcpu.set_regs(regs)
        sregs = state.sregs
        changed_sregs = False
        for i, name in enumerate(ctx.SEGMENT_NAMES):
            if after["segments"][i] != before["segments"][i]:
                setattr(sregs, name, cache_to_segment(*after["segments"][i]))
                changed_sregs = True
        if after["crs"] != before["crs"]:
            sregs.cr0, _, sregs.cr2, sregs.cr3, sregs.cr4 = after["crs"]
            changed_sregs = True
        if after["gdt"] != before["gdt"]:
            sregs.gdt.base, sregs.gdt.limit = after["gdt"]
            changed_sregs = True
        if after["idt"] != before["idt"]:
            sregs.idt.base, sregs.idt.limit = after["idt"]
            changed_sregs = True
        if after["efer"] != before["efer"]:
            sregs.efer = after["efer"]
            changed_sregs = True
        if changed_sregs:
            vcpu.set_sregs(sregs)
        if state.full:
            if after["xcr0"] != before["xcr0"] and hasattr(vcpu, "set_xcrs"):
                vcpu.set_xcrs({0: after["xcr0"]})
            if after["fpu"] != before["fpu"]:
                if state.xsave is not None:
                    vcpu.set_xsave(fpu_into_xsave(state.xsave, after["fpu"]))
                else:
                    vcpu.set_fpu(after["fpu"])
        if state.msrs:
            changed = {m: v for m, v in after["msrs"].items()
                       if m in state.msrs and v != before["msrs"].get(m)}  # fmt: skip
            if changed:
                vcpu.set_msrs(changed)
        events = state.events
        if events is not None:
            shadow = events["interrupt"]["shadow"]
            new_shadow = 0
            if after["shadow"]:
                new_shadow = KVM_X86_SHADOW_INT_STI if mnemonic == "sti" else KVM_X86_SHADOW_INT_MOV_SS
            if mnemonic in ("iret", "iretd", "iretq") and events["nmi"]["masked"]:
                events["nmi"]["masked"] = 0
                events_changed = True
            if new_shadow != shadow or events_changed:
                events["interrupt"]["shadow"] = new_shadow
                vcpu.set_vcpu_events(events)

    # ------------------------------------------------------------ the callback
    def __call__(self, vcpu, failure: EmulationFailure) -> None:
        start = time.perf_counter()
        index = vcpu.index
        stepper = self.stepper(index)
        window = failure.insn
        if not window:
            # KVM gave no instruction bytes: read them through the guest's page tables
            stepper.load(MovedState(vcpu.get_regs(), vcpu.get_sregs(), None, False))
            mstate = system.MachineState(stepper.uc)
            window = mstate.read_bytes(mstate.segs[ctx.CS][1] + mstate.rip, 15)
        sregs = vcpu.get_sregs()
        with self._lock:  # the decoder and its cache are shared by the vCPU threads
            insn, mnemonic, text = self._decode(window, self._code_bits(sregs))
        full = mnemonic not in INTEGER_ONLY
        msrs = mnemonic in MSR_USERS
        state = self.read_state(vcpu, full, sregs, msrs)
        if full and mnemonic in XSAVE_FAMILY and state.xcr0 & ~INTERP_XSTATE:
            self._fail(vcpu, state, insn, text,
                       f"XCR0 is {state.xcr0:#x}: the interpreter's {mnemonic} covers only x87/SSE state (0x3); "
                       "the guest was offered XSAVE features the interpreter lacks")  # fmt: skip
        if mnemonic.startswith("v") and mnemonic not in ("verr", "verw"):
            # unicorn 2.1.4 decodes some VEX forms as their legacy SSE twins (vpxor xmm0, xmm1, xmm2
            # runs as pxor xmm0, xmm2): never step them, the result would be silently wrong
            self._fail(vcpu, state, insn, text, "the interpreter does not implement AVX (VEX/EVEX) instructions")
        stepper.load(state)
        before = stepper.snapshot(full, msrs)
        events_changed = False
        delivered = None
        try:
            injected = stepper.deliver_event(state.events) if state.events else None
            if injected is not None:
                # KVM was delivering an event before the instruction: deliver it, run nothing else
                ev = state.events
                ev["exception"]["injected"] = ev["exception"]["pending"] = 0
                ev["interrupt"]["injected"] = 0
                if ev["nmi"]["injected"]:
                    ev["nmi"]["injected"], ev["nmi"]["masked"] = 0, 1
                events_changed = True
                delivered = injected
            else:
                delivered = stepper.step(state.regs.rip, mnemonic, len(insn))
        except StepRefused as err:
            self._fail(vcpu, state, insn, text, str(err))
        after = stepper.snapshot(full, msrs)
        if (after["crs"], after["gdt"], after["idt"], after["efer"]) != (before["crs"], before["gdt"], before["idt"],
                                                                           before["efer"]):  # fmt: skip
            stepper._system_loaded = None  # the engine no longer holds what was last written to it
        if delivered is None and after["gprs"] == before["gprs"] and after["segments"] == before["segments"]:
            self._fail(vcpu, state, insn, text, "the interpreter executed nothing (the step made no progress)")
        self.write_back(vcpu, state, before, after, mnemonic, events_changed)
        elapsed = time.perf_counter() - start
        with self._lock:
            stats = self._stats.get(insn)
            first = stats is None
            if first:
                stats = self._stats[insn] = InsnStats(text, mnemonic)
            stats.count += 1
            stats.seconds += elapsed
            self.total += 1
            self.seconds += elapsed
        if first:
            log.info(
                "fallback: vcpu %d at rip %#x: KVM cannot emulate %s (%s); stepped in the interpreter%s",
                index, state.regs.rip, text, insn.hex(" "), f", {delivered} delivered" if delivered else "",
            )

    def _fail(self, vcpu, state: MovedState, insn: bytes, text: str, why: str):
        raise GuestError(
            f"the interpreter fallback cannot execute {text} (bytes: {insn.hex(' ')}): {why}",
            rip=state.regs.rip,
            vcpu=vcpu.index,
        )

    # ------------------------------------------------------------ reporting
    def counts(self) -> dict[str, int]:
        """``"<mnemonic and operands> (<bytes>)" -> count``, most frequent first."""
        with self._lock:
            items = sorted(self._stats.items(), key=lambda kv: -kv[1].count)
            return {f"{s.text} ({insn.hex(' ')})": s.count for insn, s in items}

    def summary(self) -> list[str]:
        """Lines for the exit report: total, mean cost per fallback, and each instruction."""
        with self._lock:
            if not self.total:
                return []
            lines = [f"interpreter fallbacks: {self.total} in {self.seconds:.3f} s "
                     f"({self.seconds / self.total * 1e6:.0f} us each)"]  # fmt: skip
            for insn, s in sorted(self._stats.items(), key=lambda kv: -kv[1].count):
                lines.append(f"  {s.count:8d} x {s.text} ({insn.hex(' ')}), {s.seconds / s.count * 1e6:.0f} us each")
            return lines

    def close(self) -> None:
        for stepper in self._steppers.values():
            stepper.close()
        self._steppers.clear()
