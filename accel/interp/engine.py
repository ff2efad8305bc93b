"""The one wrapper around unicorn: engine set-up, hooks, the memory map, the context layout, registers.

Both users of unicorn build on ``Engine``: the interpreter vCPU (``vcpu.py``)
and the one-instruction stepper (``accel/stepper.py``). Nothing else in pyvmm
touches a ``Uc`` object's internals.

unicorn's register API cannot load a segment's hidden part (base, limit, flags)
in a 64-bit engine, set the CPL, read a fault's error code, clear QEMU's
"previous exception" record or reach XCR0. All of these live in the
``uc_context`` blob that ``context_save``/``context_restore`` copy (a 40-byte
header, then QEMU's ``CPUX86State``): ``Blob`` patches it. Stopping an engine
from another thread and telling ``hlt`` from a stop need two of QEMU's
``CPUState`` fields and two of ``uc_struct``'s. Their offsets are internal to
the pinned unicorn version and to the host's C ABI (``sigjmp_buf`` and mutex
sizes differ between Linux, macOS and Windows), so they are *found* at start-up
in a scratch engine by the values they hold, every read going through
``_peek`` (a failed read is an error, never a crash), and then verified by
behaviour (``verify_layout``). A host where they cannot be found makes the
interpreter unusable with a reason (``pyvmm check`` shows it), never a guest
that misbehaves.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
import threading
import time
from dataclasses import dataclass

from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_RESOURCE,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_MEM_WRITE,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    Uc,
    UcError,
)
from unicorn import x86_const as x86

from pyvmm.arch.x86.registers import RFLAGS_VM
from pyvmm.accel.x86 import DescriptorTable, FpuState, Regs, Segment, SpecialRegs
from pyvmm.arch.x86.msrs import MSR_EFER
from pyvmm.errors import AccelError

SUPPORTED_UNICORN = (2, 1, 4)
PHYS_ADDR_LIMIT = 1 << 40  # CPUID 0x80000008: 40 physical address bits
#: QEMU's Broadwell model: Haswell's (the engine's default) plus what TCG executes of Broadwell's
#: additions (SMAP with STAC/CLAC, ADX, RDSEED, PREFETCHW), filtered by QEMU to what TCG implements
CPU_MODEL = x86.UC_CPU_X86_BROADWELL
NEVER = 1 << 63  # a non-canonical "until": emulation never stops there
U64 = (1 << 64) - 1

# Byte offsets inside the uc_context blob (header of 40 bytes + CPUX86State). CPUX86State holds
# only fixed-width fields, so these are the same on every 64-bit host; verify_layout checks them.
GPRS = 40  # regs[16] in QEMU's order (RAX RCX RDX RBX RSP RBP RSI RDI R8..R15), then eip
RIP = GPRS + 16 * 8
HFLAGS = 216
SEGMENTS = 224  # SegmentCache[6] (ES CS SS DS FS GS), then LDT, TR, GDT, IDT; 24 bytes each
SEGMENT_SIZE = 24
CR0 = 464  # CR0..CR4, 8 bytes each
EFER = 632
ERROR_CODE = 5424  # int error_code
EXCEPTION_IS_INT = 5428  # int: 1 for int n / int3 / into
EXCEPTION_NEXT_EIP = 5432  # u64
OLD_EXCEPTION = 5536  # int: QEMU's double-fault tracking, never reset by unicorn
TSC_OFFSET = 5552  # u64 added to the host TSC by RDTSC
QEMU_GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                  "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # fmt: skip

# Segment register numbers in CPUX86State.segs (QEMU's R_*), plus LDT and TR.
ES, CS, SS, DS, FS, GS, LDT, TR = range(8)
SEGMENT_NAMES = ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr")

# QEMU hflags bits.
HF_CPL_MASK = 3
HF_INHIBIT_IRQ = 1 << 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
HF_VM = 1 << 17

# QEMU segment cache flag bits (the descriptor's high dword, in place).
DESC_TYPE_SHIFT = 8
DESC_S = 1 << 12
DESC_DPL_SHIFT = 13
DESC_P = 1 << 15
DESC_AVL = 1 << 20
DESC_L = 1 << 21
DESC_B = 1 << 22
DESC_G = 1 << 23

_SEGMENT = struct.Struct("<I4xQII")
_STATE = struct.Struct("<17Q")  # the 16 GPRs and RIP

#: What ``emu_start`` raises after a ``BlockExit.request``: an error code unicorn itself
#: only uses for resource exhaustion at set-up, never during emulation.
STOPPED_ERROR = UC_ERR_RESOURCE

_GPR_IDS = (
    x86.UC_X86_REG_RAX, x86.UC_X86_REG_RBX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX,
    x86.UC_X86_REG_RSI, x86.UC_X86_REG_RDI, x86.UC_X86_REG_RSP, x86.UC_X86_REG_RBP,
    x86.UC_X86_REG_R8, x86.UC_X86_REG_R9, x86.UC_X86_REG_R10, x86.UC_X86_REG_R11,
    x86.UC_X86_REG_R12, x86.UC_X86_REG_R13, x86.UC_X86_REG_R14, x86.UC_X86_REG_R15,
    x86.UC_X86_REG_RIP, x86.UC_X86_REG_RFLAGS,
)  # fmt: skip
_REG_FIELDS = tuple(Regs.__dataclass_fields__)


def _fail(what: str) -> None:
    raise AccelError("interp", f"unicorn version/layout not supported: {what}")


# --------------------------------------------------------------------------
# Reading engine memory without crashing


class _Peek:
    """Reads host memory at an address that may be invalid: None instead of a crash.

    POSIX: the kernel copies the bytes into a pipe and fails with EFAULT for an
    unmapped address. Windows: ReadProcessMemory on the own process fails cleanly.
    """

    def __init__(self):
        if sys.platform == "win32":
            kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
            self._read = kernel32.ReadProcessMemory
            self._read.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                   ctypes.POINTER(ctypes.c_size_t)]  # fmt: skip
            self._read.restype = ctypes.c_int
            self._process = kernel32.GetCurrentProcess()
            self._pipe = None
        else:
            self._pipe = os.pipe()

    def __call__(self, address: int, size: int) -> bytes | None:
        if address <= 0 or address + size > (1 << 48):
            return None
        if self._pipe is None:
            out = ctypes.create_string_buffer(size)
            done = ctypes.c_size_t()
            ok = self._read(self._process, address, out, size, ctypes.byref(done))
            return out.raw if ok and done.value == size else None
        chunks = []
        read_fd, write_fd = self._pipe
        for start in range(0, size, 4096):
            length = min(4096, size - start)
            try:
                written = os.write(write_fd, (ctypes.c_char * length).from_address(address + start))
            except OSError:
                written = -1
            if written != length:
                # part of a chunk may have gone into the pipe before the fault (BSD pipes keep it)
                self._drain()
                return None
            data = os.read(read_fd, length)
            if len(data) != length:
                self._drain()
                return None
            chunks.append(data)
        return b"".join(chunks)

    def _drain(self) -> None:
        read_fd = self._pipe[0]
        os.set_blocking(read_fd, False)
        try:
            while os.read(read_fd, 65536):
                pass
        except BlockingIOError:
            pass
        finally:
            os.set_blocking(read_fd, True)

    def close(self) -> None:
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None


# --------------------------------------------------------------------------
# uc_struct and CPUState offsets, found by value


# struct uc_struct (uc_priv.h): the run of fields
#   u32 target_page_size, u32 target_page_align, u64 qemu_host_page_size,
#   u64 qemu_real_host_page_size, int qemu_icache_linesize, int context_content,
#   int cpu_context_size, u64 next_pc, bool hook_insert, bool first_tb,
#   bool no_exit_request, bool init_done
# is found by its values ("the anchor"); no_exit_request is 50 bytes after its start.
_UC_ANCHOR = struct.Struct("<IIQQiii")
NO_EXIT_REQUEST_FROM_ANCHOR = 50
INIT_DONE_FROM_ANCHOR = 51
UC_STRUCT_SCAN = 0x4000
CPU_STATE_SCAN = 0x10000


@dataclass(frozen=True)
class Layout:
    """Where the fields pyvmm writes live on this host (byte offsets)."""

    #: uc_struct: ``invalid_addr`` (u64) and ``invalid_error`` (int), relative to the anchor
    invalid_addr_from_anchor: int
    invalid_error_from_anchor: int
    #: uc_struct.cpu (the CPUState pointer), from the start of uc_struct
    uc_cpu_pointer: int
    #: CPUState: exit_request (bool), env_ptr, icount_decr_ptr, halted (u32), uc (back pointer)
    cpu_exit_request: int
    cpu_env_pointer: int
    cpu_icount_decr_pointer: int
    cpu_halted: int
    cpu_uc_pointer: int
    #: XCR0 in the context blob (not in the register API)
    xcr0: int


#: What the layout discovery finds with unicorn 2.1.4 on Linux x86_64 (glibc); tests pin it.
LINUX_X86_64_LAYOUT = Layout(-568, -560, 0x1B8, 0x15, 0x128, 0x130, 0x8198, 0x81A8, 4944)

_layout: Layout | None = None
_layout_error: AccelError | None = None
_layout_lock = threading.Lock()


def _vmem_translate():
    """``uc_vmem_translate`` of the loaded libunicorn (2.1.4 exports it; its Python binding does not)."""
    from unicorn.unicorn_py3 import unicorn as binding

    function = binding.uclib.uc_vmem_translate
    function.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.POINTER(ctypes.c_uint64))
    function.restype = ctypes.c_int
    return function


def _handle(uc: Uc) -> int:
    return ctypes.cast(uc._uch, ctypes.c_void_p).value


def _anchor(uc: Uc, peek) -> int:
    """Address of ``uc_struct.target_page_size``, found by the values of the fields after it."""
    base = _handle(uc)
    try:
        raw = peek(base, UC_STRUCT_SCAN)
    except AccelError:
        raw = None
    raw = raw or peek(base, 0x1000)
    if raw is None:
        _fail("uc_struct cannot be read")
    context_bytes = uc.context_save().size
    found = []
    for offset in range(0, len(raw) - 64, 4):
        page, align, host_page, real_page, _, content, cpu_context = _UC_ANCHOR.unpack_from(raw, offset)
        if page == 4096 and align == 4095 and host_page == real_page and host_page in (4096, 16384, 65536):
            if content == 1 and 0 < cpu_context < context_bytes:
                found.append(offset)
    if len(found) != 1:
        _fail(f"uc_struct run-state fields not found ({len(found)} candidates)")
    return base + found[0]


def _soft(peek, address: int, size: int) -> bytes | None:
    """A read that may fail (probing candidate pointers): None instead of an error."""
    try:
        return peek(address, size)
    except AccelError:
        return None


def _u64s(raw: bytes) -> list[int]:
    return list(struct.unpack_from(f"<{len(raw) // 8}Q", raw))


def _find_cpu_state(uc: Uc, peek) -> tuple[int, int, int]:
    """(offset of uc_struct.cpu, CPUState address, offset of CPUState.uc), found by value.

    CPUState begins with nr_cores = nr_threads = 1 and holds a pointer back to the
    uc_struct; exactly one such block must be reachable from uc_struct. Several fields
    point to it (``cpu`` is the first; later ones belong to the TCG state), and the
    first pointer back is ``CPUState.uc`` (X86CPU's env holds another, further on).
    """
    base = _handle(uc)
    raw = peek(base, 0x1000)
    if raw is None:
        _fail("uc_struct cannot be read")
    found = []
    for index, value in enumerate(_u64s(raw)):
        if value % 16 or value < 0x10000 or value == base:
            continue
        head = _soft(peek, value, 8)
        if head is None or struct.unpack("<ii", head) != (1, 1):
            continue
        block = _soft(peek, value, CPU_STATE_SCAN)
        if block is None:
            continue
        back = [i * 8 for i, v in enumerate(_u64s(block)) if v == base]
        if back:
            found.append((index * 8, value, back[0]))
    if len({value for _, value, _ in found}) != 1:
        _fail(f"QEMU CPUState not found from uc_struct ({len(found)} candidates)")
    return found[0]


def _discover_layout() -> Layout:
    peek = _Peek()

    def checked(address: int, size: int) -> bytes:
        data = peek(address, size)
        if data is None:
            _fail(f"engine memory at {address:#x}+{size:#x} cannot be read")
        return data

    try:
        return _discover(checked)
    finally:
        peek.close()


def _discover(peek) -> Layout:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    page = ctypes.create_string_buffer(0x2000)
    uc.mem_map_ptr(0, 0x2000, UC_PROT_ALL, ctypes.addressof(page))
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    base = _handle(uc)
    anchor = _anchor(uc, peek)

    # invalid_addr: an unmapped fetch at a distinctive address leaves it in uc_struct
    marker = 0x7654321000
    try:
        uc.emu_start(marker, 0)
    except UcError:
        pass
    raw = peek(base, anchor - base + 64)
    hits = [i * 8 for i, v in enumerate(_u64s(raw[: (anchor - base) // 8 * 8])) if v == marker]
    if len(hits) != 1:
        _fail(f"uc_struct invalid_addr not found ({len(hits)} candidates)")
    invalid_addr = hits[0] - (anchor - base)

    uc_cpu, cpu, cpu_uc = _find_cpu_state(uc, peek)

    # env_ptr then icount_decr_ptr: X86CPU.neg.icount_decr lies 16 bytes before X86CPU.env
    head = _u64s(peek(cpu, 0x1000))
    pairs = [i * 8 for i in range(len(head) - 1)
             if head[i] - head[i + 1] == 0x10 and 0 < head[i + 1] - cpu < CPU_STATE_SCAN]  # fmt: skip
    if len(pairs) != 1:
        _fail(f"CPUState env_ptr/icount_decr_ptr not found ({len(pairs)} candidates)")
    env_pointer = pairs[0]

    # exit_request: the one byte of the CPUState head that an emu_stop from inside emulation sets
    before = {}

    def on_interrupt(uc, vector, _):
        before["head"] = peek(cpu, 0x40)
        uc.emu_stop()
        before["after"] = peek(cpu, 0x40)

    hook = uc.hook_add(UC_HOOK_INTR, on_interrupt)
    page[0x100:0x102] = b"\xcd\x80"  # int 0x80
    uc.emu_start(0x100, NEVER)
    uc.hook_del(hook)
    changed = [i for i, (a, b) in enumerate(zip(before.get("head", b""), before.get("after", b""))) if a == 0 and b == 1]
    if len(changed) != 1:
        _fail(f"CPUState exit_request not found ({len(changed)} candidates)")
    exit_request = changed[0]

    # halted: the u32 that each hlt turns from 0 to 1 and each later emu_start clears again
    page[0x200:0x202] = b"\x90\xf4"  # nop; hlt
    hook = uc.hook_add(UC_HOOK_INTR, lambda uc, vector, _: uc.emu_stop())
    samples = []
    for _ in range(3):
        uc.emu_start(0x100, NEVER)  # int 0x80, stopped in the hook: not halted
        samples.append(peek(cpu, CPU_STATE_SCAN))
        uc.emu_start(0x200, 0)
        samples.append(peek(cpu, CPU_STATE_SCAN))
    uc.hook_del(hook)
    pattern = (0, 1) * 3
    flips = [i for i in range(0, CPU_STATE_SCAN, 4)
             if tuple(struct.unpack_from("<I", sample, i)[0] for sample in samples) == pattern]  # fmt: skip
    # Under load another flag has been seen to follow the same pattern (1 run in ~900). In
    # unicorn's CPUState ``halted`` comes shortly before ``uc``: take the nearest candidate below.
    before_uc = [i for i in flips if cpu_uc - 0x100 <= i < cpu_uc]
    if not before_uc:
        _fail(f"CPUState halted not found ({len(flips)} candidates, none just before CPUState.uc)")
    flips = [max(before_uc)]
    return Layout(invalid_addr, invalid_addr + 8, uc_cpu, exit_request, env_pointer, env_pointer + 8, flips[0], cpu_uc,
                  _find_xcr0(uc, page))  # fmt: skip


def _find_xcr0(uc: Uc, page) -> int:
    """XCR0's offset in the context blob: where xsetbv(1) and xsetbv(3) leave 1 and 3."""
    uc.reg_write(x86.UC_X86_REG_CR4, uc.reg_read(x86.UC_X86_REG_CR4) | (1 << 18) | (1 << 9))
    page[0x300:0x304] = b"\x0f\x01\xd1\xf4"  # xsetbv; hlt

    def xsetbv(value: int) -> bytes:
        uc.reg_write_batch(((x86.UC_X86_REG_RAX, value), (x86.UC_X86_REG_RDX, 0), (x86.UC_X86_REG_RCX, 0)))
        uc.emu_start(0x300, NEVER)
        return Blob(uc).raw()

    one, three = xsetbv(1), xsetbv(3)
    found = [off for off in range(SEGMENTS, len(one) - 8, 8)
             if struct.unpack_from("<Q", one, off)[0] == 1 and struct.unpack_from("<Q", three, off)[0] == 3]
    if len(found) != 1:
        _fail(f"XCR0 not found in the context ({len(found)} candidates)")
    return found[0]


def layout() -> Layout:
    """The offsets of this host, found and verified once per process (AccelError when they cannot be)."""
    global _layout, _layout_error
    with _layout_lock:
        if _layout is None and _layout_error is None:
            try:
                check_version()
                found = _discover_layout()
                _verify(found)
                _layout = found
            except (UcError, TypeError, ValueError, struct.error) as err:
                _layout_error = AccelError("interp", f"unicorn version/layout not supported: layout probe failed: {err}")
                raise _layout_error from err
            except AccelError as err:
                _layout_error = err
                raise
        if _layout_error is not None:
            raise _layout_error
        return _layout


def verify_layout() -> None:
    """Find and check every offset pyvmm relies on (once per process); AccelError if unusable."""
    layout()


def check_version() -> None:
    import unicorn

    version = getattr(unicorn, "__version__", "unknown")
    if version != ".".join(map(str, SUPPORTED_UNICORN)):
        raise AccelError(
            "interp",
            f"unicorn version/layout not supported: found {version}, need "
            f"{'.'.join(map(str, SUPPORTED_UNICORN))} (pip install unicorn==2.1.4)",
        )


# --------------------------------------------------------------------------
# The context blob


class Blob:
    """A saved context, patched in place and loaded back with ``restore``."""

    __slots__ = ("uc", "context", "address")

    def __init__(self, uc: Uc):
        self.uc = uc
        self.context = uc.context_save()
        self.address = ctypes.cast(self.context.context, ctypes.c_void_p).value

    def _buffer(self, offset: int, size: int):
        return (ctypes.c_char * size).from_address(self.address + offset)

    def raw(self) -> bytes:
        return ctypes.string_at(self.address, self.context.size)

    def read(self, fmt: str, offset: int):
        return struct.unpack_from(fmt, self._buffer(offset, struct.calcsize(fmt)))

    def write(self, fmt: str, offset: int, *values) -> None:
        struct.pack_into(fmt, self._buffer(offset, struct.calcsize(fmt)), 0, *values)

    def segment(self, index: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of segment cache ``index``."""
        return _SEGMENT.unpack_from(self._buffer(SEGMENTS + SEGMENT_SIZE * index, SEGMENT_SIZE))

    def set_segment(self, index: int, selector: int, base: int, limit: int, flags: int) -> None:
        _SEGMENT.pack_into(self._buffer(SEGMENTS + SEGMENT_SIZE * index, SEGMENT_SIZE), 0, selector & 0xFFFF,
                           base & U64, limit & 0xFFFFFFFF, flags & 0xFFFFFFFF)  # fmt: skip

    @property
    def hflags(self) -> int:
        return self.read("<I", HFLAGS)[0]

    @hflags.setter
    def hflags(self, value: int) -> None:
        self.write("<I", HFLAGS, value)

    def restore(self) -> None:
        self.uc.context_restore(self.context)


def compute_hflags(old: int, cr0: int, efer: int, cs_flags: int, ss_flags: int, bases_nonzero: bool, vm86: bool) -> int:
    """QEMU's mode bits for a segment/mode state (mirrors ``cpu_x86_load_seg_cache``)."""
    pe = bool(cr0 & 1)
    lma = bool(efer & 0x400) and pe and bool(cr0 & 0x80000000)
    h = old & ~(HF_CPL_MASK | HF_CS32 | HF_SS32 | HF_ADDSEG | HF_PE | HF_LMA | HF_CS64 | HF_VM | HF_INHIBIT_IRQ)
    if pe:
        h |= HF_PE
        h |= 3 if vm86 else (ss_flags >> DESC_DPL_SHIFT) & 3
    if vm86:
        h |= HF_VM
    if lma:
        h |= HF_LMA
    if lma and cs_flags & DESC_L:
        h |= HF_CS64 | HF_CS32 | HF_SS32
        return h
    if cs_flags & DESC_B:
        h |= HF_CS32
    if ss_flags & DESC_B:
        h |= HF_SS32
    if not pe or vm86 or not (h & HF_CS32):
        h |= HF_ADDSEG
    elif bases_nonzero:
        h |= HF_ADDSEG
    return h


def segment_to_cache(seg: Segment) -> tuple[int, int, int, int]:
    """(selector, base, limit, flags) of QEMU's SegmentCache: the attribute word shifted by 8."""
    return seg.selector, seg.base, seg.limit, seg.attributes() << DESC_TYPE_SHIFT


def cache_to_segment(selector: int, base: int, limit: int, flags: int) -> Segment:
    return Segment.from_attributes(selector, base, limit, (flags >> DESC_TYPE_SHIFT) & 0xF0FF)


# --------------------------------------------------------------------------
# Stopping between blocks, and HLT


class BlockExit:
    """Stop a running engine at its next translation-block boundary, from any thread.

    Why not ``uc_emu_stop``: it sets ``uc->stop_request``, and unicorn 2.1.4's
    ``syscall``, ``sysenter``, ``cpuid`` and ``rdtsc`` helpers walk the
    UC_HOOK_INSN list and leave it at the first entry once that flag is set,
    whatever instruction that entry is for. A stop from another thread landing
    while the guest executes ``syscall`` therefore skipped the hook and the
    instruction became a two-byte no-op (measured in Linux: now and then a
    ``write()`` "returned" its own syscall number, 1, and files came out short);
    a ``cpuid`` ran unicorn's own model instead of pyvmm's table.

    ``request`` does what QEMU's ``cpu_exit`` does (``exit_request`` and the
    ``icount_decr`` high half, checked at each block's start) and marks
    ``uc->invalid_error``, which makes unicorn's loop end emulation there:
    ``emu_start`` then raises ``UcError(STOPPED_ERROR)`` with the state exact.
    A request landing between two ``emu_start`` calls is dropped (unicorn
    clears ``invalid_error`` at start), as an ``emu_stop`` would be: callers
    repeat it until the engine acknowledges.
    """

    __slots__ = ("_invalid_error", "_exit_request", "_icount_high")

    def __init__(self, uc: Uc, found: Layout | None = None):
        found = found or layout()
        cpu = _cpu_state(uc, found)
        icount = ctypes.c_uint64.from_address(cpu + found.cpu_icount_decr_pointer).value
        env = ctypes.c_uint64.from_address(cpu + found.cpu_env_pointer).value
        if not icount or env - icount != 0x10 or not 0 < icount - cpu < CPU_STATE_SCAN:
            _fail("CPUState icount_decr_ptr/env_ptr are not where expected")
        anchor = _anchor_fast(uc)
        self._invalid_error = ctypes.c_int32.from_address(anchor + found.invalid_error_from_anchor)
        self._exit_request = ctypes.c_uint8.from_address(cpu + found.cpu_exit_request)
        self._icount_high = ctypes.c_int16.from_address(icount + 2)

    def request(self) -> None:
        self._invalid_error.value = STOPPED_ERROR
        self._exit_request.value = 1
        self._icount_high.value = -1


_anchor_offset: int | None = None


def _anchor_fast(uc: Uc) -> int:
    """The anchor of an engine created after the layout was found: the same offset in every uc_struct."""
    global _anchor_offset
    if _anchor_offset is None:
        peek = _Peek()
        try:
            _anchor_offset = _anchor(uc, peek) - _handle(uc)
        finally:
            peek.close()
    return _handle(uc) + _anchor_offset


def _cpu_state(uc: Uc, found: Layout) -> int:
    """Address of the engine's QEMU ``CPUState`` (the engine must be initialised)."""
    base = _handle(uc)
    cpu = ctypes.c_uint64.from_address(base + found.uc_cpu_pointer).value
    if not cpu or ctypes.c_uint64.from_address(cpu + found.cpu_uc_pointer).value != base:
        _fail("CPUState is not where expected")
    return cpu


def _disable_midblock_exits(uc: Uc) -> None:
    """Make ``emu_stop`` take effect only at translation-block boundaries.

    unicorn 2.1.4 checks for a pending stop after *every guest memory access*
    and then restarts the current instruction from its beginning: a stop from
    another thread landing after the store of ``add [mem], 1``, ``lock xadd``
    or ``cmpxchg`` re-executes it (measured: ~1 in 3 stops of an ``add [mem]``
    loop), which corrupts a guest (Linux's preempt count, alternatives). The
    engine's own ``no_exit_request`` switch (meant for ARM IT blocks) turns
    those checks off at translation time; the check at each block's start
    stays, and there the guest state is exact. Call before anything is
    translated.
    """
    flags = _anchor_fast(uc)
    if ctypes.c_uint8.from_address(flags + INIT_DONE_FROM_ANCHOR).value != 1:
        _fail("uc_struct init_done is not where expected")
    if ctypes.c_uint8.from_address(flags + NO_EXIT_REQUEST_FROM_ANCHOR).value != 0:
        _fail("uc_struct no_exit_request is not where expected")
    ctypes.c_uint8.from_address(flags + NO_EXIT_REQUEST_FROM_ANCHOR).value = 1


# --------------------------------------------------------------------------
# Verification by behaviour


def _verify(found: Layout) -> None:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    page = ctypes.create_string_buffer(0x2000)
    uc.mem_map_ptr(0, 0x2000, UC_PROT_ALL, ctypes.addressof(page))

    # GPRs, RIP and CR2 where Blob reads and patches them
    values = {name: 0x1111111111110000 + i for i, name in enumerate(QEMU_GPR_ORDER)}
    uc.reg_write_batch(tuple((_GPR_IDS[_REG_FIELDS.index(n)], v) for n, v in values.items()))
    uc.reg_write(x86.UC_X86_REG_RIP, 0x2222)
    uc.reg_write(x86.UC_X86_REG_CR2, 0x3333)
    blob = Blob(uc)
    if blob.read("<17Q", GPRS) != tuple(values.values()) + (0x2222,):
        _fail("GPR/RIP offsets in the context differ")
    crs = blob.read("<QQQQQ", CR0)
    if crs != (uc.reg_read(x86.UC_X86_REG_CR0), 0, 0x3333, uc.reg_read(x86.UC_X86_REG_CR3),
               uc.reg_read(x86.UC_X86_REG_CR4)):  # fmt: skip
        _fail("CR offsets in the context differ")

    # Segment caches: values written through the API appear at the expected offsets.
    uc.reg_write(x86.UC_X86_REG_DS, 0x1234)
    uc.reg_write(x86.UC_X86_REG_FS_BASE, 0x1122334455)
    uc.reg_write(x86.UC_X86_REG_TR, (0x28, 0xABCD000, 0x67, 0x8B00))
    uc.reg_write(x86.UC_X86_REG_LDTR, (0x30, 0x5550000, 0x1F, 0x8200))
    blob = Blob(uc)
    if blob.segment(DS)[0] != 0x1234 or blob.segment(FS)[1] != 0x1122334455:
        _fail("segment cache offsets do not match")
    if blob.segment(TR)[:3] != (0x28, 0xABCD000, 0x67) or blob.segment(LDT)[:3] != (0x30, 0x5550000, 0x1F):
        _fail("TR/LDT cache offsets do not match")
    if blob.read("<Q", EFER)[0] != uc.reg_read(x86.UC_X86_REG_MSR, MSR_EFER):
        _fail("EFER offset does not match")

    # hflags: the PE bit follows CR0.PE through QEMU's own helper.
    uc.reg_write(x86.UC_X86_REG_CR0, 0x10)
    off = Blob(uc).hflags
    uc.reg_write(x86.UC_X86_REG_CR0, 0x11)
    on = Blob(uc).hflags
    if off & HF_PE or not on & HF_PE or (off ^ on) & ~(HF_PE | HF_ADDSEG):
        _fail(f"hflags offset does not match ({off:#x} / {on:#x})")

    # A patched CS cache and hflags switch decoding to 32-bit: "inc eax" (0x40) is a REX prefix in 64-bit mode.
    blob = Blob(uc)
    flags32 = DESC_P | DESC_S | (0xB << DESC_TYPE_SHIFT) | DESC_B | DESC_G
    blob.set_segment(CS, 0x8, 0, 0xFFFFFFFF, flags32)
    blob.set_segment(SS, 0x10, 0, 0xFFFFFFFF, DESC_P | DESC_S | (3 << DESC_TYPE_SHIFT) | DESC_B | DESC_G)
    blob.hflags = compute_hflags(blob.hflags, 0x11, 0, flags32, flags32, False, False)
    blob.write("<Q", EFER, 0)
    blob.restore()
    page[0x100:0x103] = b"\x40\x40\xf4"  # inc eax; inc eax; hlt
    uc.reg_write(x86.UC_X86_REG_RAX, 0)
    uc.emu_start(0x100, NEVER)
    if uc.reg_read(x86.UC_X86_REG_RAX) != 2:
        _fail("patched CS cache/hflags did not switch the engine to 32-bit code")

    # Exception record: a #GP with a known error code and an int 0x80.
    seen = []

    def on_interrupt(uc, vector, _):
        b = Blob(uc)
        seen.append((vector, b.read("<iiQ", ERROR_CODE), b.read("<i", OLD_EXCEPTION)[0]))
        uc.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_interrupt)
    # mov ds, ax with ax = 0x1230 beyond the GDT limit -> #GP(0x1230)
    page[0x200:0x206] = b"\x66\xb8\x30\x12\x8e\xd8"
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, 0x1000, 0xF, 0))
    uc.emu_start(0x200, NEVER)
    page[0x300:0x302] = b"\xcd\x80"
    uc.emu_start(0x300, NEVER)
    if len(seen) != 2:
        _fail(f"exception probe saw {seen}")
    (gp, (gp_code, gp_is_int, _), gp_old), (sw, (_, sw_is_int, sw_next), _) = seen
    if (gp, gp_code, gp_is_int, gp_old) != (13, 0x1230, 0, 13):
        _fail(f"error code/old exception offsets do not match: {seen[0]}")
    if (sw, sw_is_int, sw_next) != (0x80, 1, 0x302):
        _fail(f"software interrupt record offsets do not match: {seen[1]}")

    # TSC offset: RDTSC adds it.
    blob = Blob(uc)
    blob.write("<Q", TSC_OFFSET, 1 << 60)
    blob.restore()
    page[0x400:0x403] = b"\x0f\x31\xf4"
    uc.emu_start(0x400, NEVER)
    tsc = (uc.reg_read(x86.UC_X86_REG_EDX) << 32) | uc.reg_read(x86.UC_X86_REG_EAX)
    if tsc < (1 << 60):
        _fail("TSC offset does not match")

    # XCR0: a patched value is what xgetbv reads.
    uc.reg_write(x86.UC_X86_REG_CR4, uc.reg_read(x86.UC_X86_REG_CR4) | (1 << 18) | (1 << 9))
    blob = Blob(uc)
    blob.write("<Q", found.xcr0, 1)
    blob.restore()
    page[0x500:0x504] = b"\x0f\x01\xd0\xf4"  # xgetbv; hlt
    uc.reg_write(x86.UC_X86_REG_RCX, 0)
    uc.emu_start(0x500, NEVER)
    if uc.reg_read(x86.UC_X86_REG_RAX) != 1:
        _fail("a patched XCR0 is not what xgetbv reads")
    _verify_stops_are_exact(found)


def _verify_stops_are_exact(found: Layout) -> None:
    """Stops from another thread must never re-execute an instruction nor skip a hook."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    page = ctypes.create_string_buffer(0x2000)
    uc.mem_map_ptr(0, 0x2000, UC_PROT_ALL, ctypes.addressof(page))
    _disable_midblock_exits(uc)
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])

    # uc_struct.invalid_addr / invalid_error (BlockExit writes the latter): an unmapped fetch fills them.
    anchor = _anchor_fast(uc)
    try:
        uc.emu_start(0x7654321000, 0)
    except UcError:
        pass
    if ctypes.c_uint64.from_address(anchor + found.invalid_addr_from_anchor).value != 0x7654321000:
        _fail("uc_struct invalid_addr is not where expected")
    if ctypes.c_int32.from_address(anchor + found.invalid_error_from_anchor).value != 0:
        _fail("uc_struct invalid_error is not where expected")
    stopper = BlockExit(uc, found)

    syscalls = []
    uc.hook_add(UC_HOOK_INSN, lambda uc, _: syscalls.append(1), None, 1, 0, x86.UC_X86_INS_SYSCALL)
    # 1: inc rcx; incl [0x1000]; jmp 1b
    page[0x100:0x10C] = bytes.fromhex("48ffc1 ff042500100000 ebf4")
    # 2: a delay loop, then one long block ending in "inc rbx; syscall", jmp 2b: stops land inside
    # that block often enough that a skipped hook can show (with uc_emu_stop, ~1 in 150 stops).
    # 100 stops each keep start-up short (~30 ms); tests/unit/test_interp_stops.py runs 1,500.
    syscall_loop = bytes.fromhex("bad0070000 ffca 75fc") + bytes.fromhex("48ffc0") * 400 + bytes.fromhex("48ffc3 0f05")
    syscall_loop += b"\xe9" + (-(len(syscall_loop) + 5)).to_bytes(4, "little", signed=True)
    page[0x400 : 0x400 + len(syscall_loop)] = syscall_loop
    done = threading.Event()

    def kick():
        while not done.is_set():
            stopper.request()
            time.sleep(0.00005)

    def run_stopped(start: int, times: int) -> None:
        rip = start
        for _ in range(times):
            try:
                uc.emu_start(rip, 0)
            except UcError as err:
                if err.errno != STOPPED_ERROR:
                    raise
            rip = uc.reg_read(x86.UC_X86_REG_RIP)

    kicker = threading.Thread(target=kick, daemon=True)
    kicker.start()
    try:
        run_stopped(0x100, 100)
        run_stopped(0x400, 100)
    finally:
        done.set()
        kicker.join()
    count = struct.unpack_from("<I", page, 0x1000)[0]
    if count != uc.reg_read(x86.UC_X86_REG_RCX) & 0xFFFFFFFF:
        _fail(f"stops re-execute instructions ({count} increments for {uc.reg_read(x86.UC_X86_REG_RCX)} loops)")
    if len(syscalls) != uc.reg_read(x86.UC_X86_REG_RBX):
        _fail(f"stops skip hooks ({len(syscalls)} syscall hooks for {uc.reg_read(x86.UC_X86_REG_RBX)} syscalls)")
    # The halted flag: 0 after those stops, 1 after hlt, 0 again after a stop.
    halted = ctypes.c_uint32.from_address(_cpu_state(uc, found) + found.cpu_halted)
    if halted.value != 0:
        _fail("CPUState.halted is set after a stop")
    page[0x200:0x202] = b"\x90\xf4"
    uc.emu_start(0x200, 0)
    if halted.value != 1 or uc.reg_read(x86.UC_X86_REG_RIP) != 0x202:
        _fail("CPUState.halted is not set by hlt")
    # The counting loop again, until a stop: requested again and again, because one made before
    # emu_start is really running is lost (a single 2 ms timer hung start-up on a loaded host).
    done.clear()
    kicker = threading.Thread(target=kick, daemon=True)
    timer = threading.Timer(0.002, kicker.start)
    timer.start()
    try:
        uc.emu_start(0x100, 0)
    except UcError as err:
        if err.errno != STOPPED_ERROR:
            raise
    else:
        _fail("a BlockExit request did not end emu_start with STOPPED_ERROR")
    finally:
        done.set()
        timer.join()
        if kicker.is_alive():
            kicker.join()
    if halted.value != 0:
        _fail("CPUState.halted is not cleared by emu_start")


# --------------------------------------------------------------------------
# The engine


class Engine:
    """A unicorn x86-64 engine with pyvmm's set-up, its memory map and its register conversions.

    ``async_stops`` prepares the engine to be stopped from other threads between
    translation blocks (``block_exit``) and exposes QEMU's halted flag
    (``halted``); the stepper, which runs one instruction per call, needs neither.
    """

    def __init__(self, *, async_stops: bool = False):
        self.layout = layout()
        self.uc = uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_cpu_model(CPU_MODEL)
        # With "exits" enabled (and none set) emu_start ignores ``until``. Without it, unicorn
        # translates until-1 on every start, and in 32-bit paged mode that failed walk overwrites CR2.
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self.block_exit: BlockExit | None = None
        self.halted: ctypes.c_uint32 | None = None
        if async_stops:
            _disable_midblock_exits(uc)  # async stops must land only between blocks
            self.halted = ctypes.c_uint32.from_address(_cpu_state(uc, self.layout) + self.layout.cpu_halted)
            self.block_exit = BlockExit(uc, self.layout)
        self._ram: dict[int, tuple[int, int]] = {}  # guest_addr -> (size, pointer)
        self._translate = None
        self._holes: list[tuple[int, int]] = []
        self._exports: list = []

    # ------------------------------------------------------------------ memory
    def map_memory(self, ram, mmio_read, mmio_write, *, top: int = PHYS_ADDR_LIMIT) -> None:
        """Map guest RAM ``[(guest_addr, size, host pointer, readonly)]`` without copying, and every gap
        below ``top`` (or the end of RAM) as MMIO served by ``mmio_read(uc, offset, size, base)`` /
        ``mmio_write(uc, offset, size, value, base)``. Called again, it maps new RAM and redoes the gaps.
        """
        uc = self.uc
        for start, size in self._holes:
            uc.mem_unmap(start, size)
        self._holes = []
        spans = []
        for guest_addr, size, pointer, readonly in sorted(ram):
            if guest_addr not in self._ram:
                uc.mem_map_ptr(guest_addr, size, UC_PROT_READ | UC_PROT_EXEC if readonly else UC_PROT_ALL, pointer)
                self._ram[guest_addr] = (size, pointer)
            spans.append((guest_addr, guest_addr + size))
        top = max([top] + [end for _, end in spans])
        cursor = 0
        for start, end in spans + [(top, top)]:
            if start > cursor:
                uc.mmio_map(cursor, start - cursor, mmio_read, cursor, mmio_write, cursor)
                self._holes.append((cursor, start - cursor))
            cursor = max(cursor, end)

    # ------------------------------------------------------------------ RDMSR, WRMSR, CR8
    def redirect_helpers(self, handler) -> bool:
        """Route this engine's RDMSR/WRMSR and MOV CR8 to ``handler`` (accel/interp/redirect.py);
        False, with unicorn's own behaviour kept, where the redirection is not available."""
        from pyvmm.accel.interp import redirect

        if not helpers_redirected():
            return False
        self._env = ctypes.c_uint64.from_address(_cpu_state(self.uc, self.layout) + self.layout.cpu_env_pointer).value
        redirect.register(self._env, handler)
        return True

    def watch_window(self, on: bool) -> None:
        """While on, POPF/IRET call the handler's ``guest_if_set``/``guest_iret``."""
        from pyvmm.accel.interp import redirect

        redirect.watch(self._env, on)

    def release_helpers(self) -> None:
        from pyvmm.accel.interp import redirect

        if getattr(self, "_env", None):
            redirect.unregister(self._env)

    @property
    def live_tsc_offset(self) -> int:
        """The TSC offset in the running engine's own state (for the engine thread, mid-instruction:
        a context save and restore would be too heavy there)."""
        return ctypes.c_uint64.from_address(self._env + TSC_OFFSET - GPRS).value

    @live_tsc_offset.setter
    def live_tsc_offset(self, value: int) -> None:
        ctypes.c_uint64.from_address(self._env + TSC_OFFSET - GPRS).value = value & U64

    def keep_alive(self, export) -> None:
        """Hold a buffer export (ctypes view of guest RAM) for the engine's lifetime."""
        self._exports.append(export)

    # ------------------------------------------------------------------ hooks
    def install_hooks(self, owner) -> None:
        """The hooks every pyvmm engine has: interrupts, port I/O, syscall, sysenter, cpuid.

        ``owner`` provides ``_on_interrupt``, ``_on_in``, ``_on_out`` and the
        ``system.EngineHooks`` methods.
        """
        uc = self.uc
        uc.hook_add(UC_HOOK_INTR, owner._on_interrupt)
        uc.hook_add(UC_HOOK_INSN, owner._on_in, None, 1, 0, x86.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, owner._on_out, None, 1, 0, x86.UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, owner._on_syscall, None, 1, 0, x86.UC_X86_INS_SYSCALL)
        uc.hook_add(UC_HOOK_INSN, owner._on_sysenter, None, 1, 0, x86.UC_X86_INS_SYSENTER)
        uc.hook_add(UC_HOOK_INSN, owner._on_cpuid, None, 1, 0, x86.UC_X86_INS_CPUID)

    def exact_stops(self, on: bool) -> None:
        """With ``on``, a stop asked for inside a block (a hook writing RIP and calling emu_stop) takes
        effect at once instead of at the block's end: a debugger's single step needs it. The hazard
        ``_disable_midblock_exits`` avoids (an *asynchronous* stop landing after a store re-runs the
        instruction) is the caller's to avoid meanwhile: no stops from other threads. Translated code
        is dropped: the switch is read when code is translated."""
        flag = ctypes.c_uint8.from_address(_anchor_fast(self.uc) + NO_EXIT_REQUEST_FROM_ANCHOR)
        if flag.value != (0 if on else 1):
            flag.value = 0 if on else 1
            self.uc.ctl_flush_tb()

    def physical_address(self, linear: int) -> int | None:
        """Where ``linear`` lies in guest-physical memory for the current mode and page tables
        (None: not mapped). For hooks: it reads the engine's own translation."""
        translate = self._translate or _vmem_translate()
        self._translate = translate
        physical = ctypes.c_uint64()
        if translate(self.uc._uch, linear, UC_PROT_EXEC, ctypes.byref(physical)) != 0:
            return None
        return physical.value

    def on_ram_write(self, record) -> None:
        """Call ``record(guest_physical, size)`` for every store this engine makes (a Python call per
        store: only for engines that run a few instructions, such as the stepper)."""
        translate = _vmem_translate()
        handle = self.uc._uch
        physical = ctypes.c_uint64()

        def on_write(uc, _access, address, size, _value, _data) -> None:
            # unicorn passes the linear address; the store has passed its checks, so it translates
            if translate(handle, address, UC_PROT_WRITE, ctypes.byref(physical)) == 0:
                record(physical.value, size)

        self.uc.hook_add(UC_HOOK_MEM_WRITE, on_write)

    def flush(self) -> None:
        """Forget translated code and cached translations (guest code or page tables changed behind it)."""
        self.uc.ctl_flush_tb()
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    # ------------------------------------------------------------------ registers
    def read_regs(self) -> Regs:
        return Regs(*self.uc.reg_read_batch(_GPR_IDS))

    def write_regs(self, regs: Regs) -> None:
        self.uc.reg_write_batch(tuple((rid, getattr(regs, name) & U64) for rid, name in zip(_GPR_IDS, _REG_FIELDS)))

    def read_sregs(self, *, cr8: int, apic_base: int) -> SpecialRegs:
        uc = self.uc
        blob = Blob(uc)
        segs = [cache_to_segment(*blob.segment(i)) for i in range(8)]
        _, gdt_base, gdt_limit, _ = uc.reg_read(x86.UC_X86_REG_GDTR)
        _, idt_base, idt_limit, _ = uc.reg_read(x86.UC_X86_REG_IDTR)
        cr0, cr2, cr3, cr4 = uc.reg_read_batch(
            (x86.UC_X86_REG_CR0, x86.UC_X86_REG_CR2, x86.UC_X86_REG_CR3, x86.UC_X86_REG_CR4)
        )
        return SpecialRegs(
            es=segs[ES], cs=segs[CS], ss=segs[SS], ds=segs[DS], fs=segs[FS], gs=segs[GS], ldt=segs[LDT], tr=segs[TR],
            gdt=DescriptorTable(gdt_base, gdt_limit), idt=DescriptorTable(idt_base, idt_limit),
            cr0=cr0, cr2=cr2, cr3=cr3, cr4=cr4, cr8=cr8, efer=uc.reg_read(x86.UC_X86_REG_MSR, MSR_EFER),
            apic_base=apic_base,
        )  # fmt: skip

    def write_system_regs(self, sregs: SpecialRegs) -> None:
        """CR0/CR2/CR3/CR4/EFER/GDTR/IDTR through the engine's own helpers (its mode bits and TLB follow)."""
        uc = self.uc
        uc.reg_write(x86.UC_X86_REG_CR3, sregs.cr3)
        uc.reg_write(x86.UC_X86_REG_CR4, sregs.cr4)
        uc.reg_write(x86.UC_X86_REG_CR0, sregs.cr0)
        uc.reg_write(x86.UC_X86_REG_CR2, sregs.cr2)
        uc.reg_write(x86.UC_X86_REG_MSR, (MSR_EFER, sregs.efer))
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, sregs.gdt.base, sregs.gdt.limit, 0))
        uc.reg_write(x86.UC_X86_REG_IDTR, (0, sregs.idt.base, sregs.idt.limit, 0))

    def write_caches(self, blob: Blob, sregs: SpecialRegs, rflags: int, *, shadow: bool = False) -> None:
        """Segment caches, EFER and the mode bits (CPL, CS64, ...) into ``blob``; clears the stale
        exception record. ``blob.restore()`` loads them."""
        caches = [segment_to_cache(getattr(sregs, name)) for name in SEGMENT_NAMES]
        for i, cache in enumerate(caches):
            blob.set_segment(i, *cache)
        blob.write("<Q", EFER, sregs.efer)
        bases = caches[DS][1] | caches[ES][1] | caches[SS][1]
        hflags = compute_hflags(blob.hflags, sregs.cr0, sregs.efer, caches[CS][3], caches[SS][3], bases != 0,
                                bool(rflags & RFLAGS_VM))  # fmt: skip
        blob.hflags = hflags | (HF_INHIBIT_IRQ if shadow else 0)
        blob.write("<i", OLD_EXCEPTION, -1)

    def write_sregs(self, sregs: SpecialRegs) -> None:
        self.write_system_regs(sregs)
        blob = Blob(self.uc)
        self.write_caches(blob, sregs, self.uc.reg_read(x86.UC_X86_REG_RFLAGS))
        blob.restore()
        self.uc.ctl_flush_tb()

    def write_gprs(self, blob: Blob, regs: Regs) -> None:
        """GPRs and RIP into ``blob`` (one patch instead of 17 register calls); RFLAGS separately."""
        blob.write("<17Q", GPRS, *(getattr(regs, name) & U64 for name in QEMU_GPR_ORDER), regs.rip & U64)

    def read_gprs(self, blob: Blob) -> tuple[int, ...]:
        """(RAX, RBX, ... R15, RIP) in ``Regs`` order, from a blob."""
        raw = blob.read("<17Q", GPRS)
        by_name = dict(zip(QEMU_GPR_ORDER, raw[:16]))
        return tuple(by_name[name] for name in _REG_FIELDS[:16]) + (raw[16],)

    def read_fpu(self) -> FpuState:
        uc = self.uc
        fsw = uc.reg_read(x86.UC_X86_REG_FPSW)
        top = (fsw >> 11) & 7
        tag = uc.reg_read(x86.UC_X86_REG_FPTAG)
        physical = []
        for i in range(8):
            mantissa, exponent = uc.reg_read(x86.UC_X86_REG_FP0 + i)
            physical.append(mantissa.to_bytes(8, "little") + exponent.to_bytes(2, "little") + bytes(6))
        ftwx = sum(1 << i for i in range(8) if (tag >> (2 * i)) & 3 != 3)  # abridged: 1 = not empty
        return FpuState(
            fcw=uc.reg_read(x86.UC_X86_REG_FPCW), fsw=fsw, ftwx=ftwx, last_opcode=uc.reg_read(x86.UC_X86_REG_FOP),
            last_ip=uc.reg_read(x86.UC_X86_REG_FIP), last_dp=uc.reg_read(x86.UC_X86_REG_FDP),
            fpr=[physical[(top + i) & 7] for i in range(8)],  # FXSAVE order: ST(0)..ST(7)
            xmm=[uc.reg_read(x86.UC_X86_REG_XMM0 + i).to_bytes(16, "little") for i in range(16)],
            mxcsr=uc.reg_read(x86.UC_X86_REG_MXCSR),
        )  # fmt: skip

    def write_fpu(self, fpu: FpuState) -> None:
        uc = self.uc
        top = (fpu.fsw >> 11) & 7
        tag = 0
        for i in range(8):
            if not fpu.ftwx & (1 << i):
                tag |= 3 << (2 * i)
        writes = [(x86.UC_X86_REG_FPCW, fpu.fcw), (x86.UC_X86_REG_FPSW, fpu.fsw), (x86.UC_X86_REG_FPTAG, tag),
                  (x86.UC_X86_REG_FOP, fpu.last_opcode), (x86.UC_X86_REG_FIP, fpu.last_ip),
                  (x86.UC_X86_REG_FDP, fpu.last_dp), (x86.UC_X86_REG_MXCSR, fpu.mxcsr)]  # fmt: skip
        for i in range(8):
            raw = bytes(fpu.fpr[i]).ljust(10, b"\0")
            writes.append((x86.UC_X86_REG_FP0 + ((top + i) & 7),
                           (int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:10], "little"))))  # fmt: skip
        for i in range(16):
            writes.append((x86.UC_X86_REG_XMM0 + i, int.from_bytes(bytes(fpu.xmm[i]).ljust(16, b"\0"), "little")))
        for reg, value in writes:
            uc.reg_write(reg, value)

    # ------------------------------------------------------------------ state in the blob only
    @property
    def xcr0(self) -> int:
        return Blob(self.uc).read("<Q", self.layout.xcr0)[0]

    @xcr0.setter
    def xcr0(self, value: int) -> None:
        blob = Blob(self.uc)
        blob.write("<Q", self.layout.xcr0, value)
        blob.restore()

    @property
    def tsc_offset(self) -> int:
        return Blob(self.uc).read("<Q", TSC_OFFSET)[0]

    @tsc_offset.setter
    def tsc_offset(self, value: int) -> None:
        blob = Blob(self.uc)
        blob.write("<Q", TSC_OFFSET, value & U64)
        blob.restore()

    @property
    def hflags(self) -> int:
        return Blob(self.uc).hflags

    def clear_shadow(self) -> None:
        blob = Blob(self.uc)
        blob.hflags = blob.hflags & ~HF_INHIBIT_IRQ
        blob.restore()

    def close(self) -> None:
        self.uc = None
        self.block_exit = None
        self.halted = None
        self._exports.clear()  # the engine is gone: guest memory may be unmapped now


# --------------------------------------------------------------------------
# The host TSC (what RDTSC in an engine adds its offset to)


class _Scratch:
    """A tiny engine that executes single instructions: cpuid (the engine's own model), rdtsc."""

    def __init__(self):
        self._lock = threading.Lock()
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.ctl_set_cpu_model(CPU_MODEL)
        self.page = ctypes.create_string_buffer(0x1000)
        self.uc.mem_map_ptr(0, 0x1000, UC_PROT_ALL, ctypes.addressof(self.page))
        self.page[0:3] = b"\x0f\xa2\xf4"  # cpuid; hlt
        self.page[0x10:0x13] = b"\x0f\x31\xf4"  # rdtsc; hlt

    def cpuid(self, leaf: int, index: int = 0) -> tuple[int, int, int, int]:
        uc = self.uc
        with self._lock:
            uc.reg_write(x86.UC_X86_REG_RAX, leaf)
            uc.reg_write(x86.UC_X86_REG_RCX, index)
            uc.emu_start(0, NEVER)
            return tuple(uc.reg_read(r) for r in (x86.UC_X86_REG_EAX, x86.UC_X86_REG_EBX, x86.UC_X86_REG_ECX,
                                                   x86.UC_X86_REG_EDX))  # fmt: skip

    def rdtsc(self) -> int:
        with self._lock:
            self.uc.emu_start(0x10, NEVER)
            return (self.uc.reg_read(x86.UC_X86_REG_EDX) << 32) | self.uc.reg_read(x86.UC_X86_REG_EAX)


_scratch: _Scratch | None = None
_scratch_lock = threading.Lock()


def scratch() -> _Scratch:
    """The process's scratch engine (created on first use)."""
    global _scratch
    with _scratch_lock:
        if _scratch is None:
            _scratch = _Scratch()
        return _scratch


def helpers_redirected() -> bool:
    """Whether this process's unicorn has its MSR/CR helpers redirected (installed on first call):
    what the vCPUs serve through them (TSC-deadline, ...) is offered only then."""
    from unicorn.unicorn_py3 import unicorn as binding

    from pyvmm.accel.interp import redirect

    return redirect.install(binding.uclib)


def host_tsc() -> int:
    """The host's TSC as every engine's RDTSC reads it before adding its offset."""
    return scratch().rdtsc()
