"""unicorn 2.1.4's saved CPU context: the offsets pyvmm patches, verified at start-up.

unicorn's register API cannot load a segment's hidden part (base, limit,
flags) in a 64-bit engine, set the CPL, read a fault's error code or clear
QEMU's "previous exception" record. All of these live in the ``uc_context``
blob that ``context_save`` / ``context_restore`` copy (a 40-byte header, then
QEMU's ``CPUX86State``). The offsets are internal to the pinned version, so
``verify_layout`` checks every one of them against a known state before a
backend uses them and refuses to run when they do not match.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time

from unicorn import UC_ARCH_X86, UC_ERR_RESOURCE, UC_HOOK_INSN, UC_HOOK_INTR, UC_MODE_64, UC_PROT_ALL, Uc, UcError
from unicorn import x86_const as x86

from pyvmm.errors import AccelError

SUPPORTED_UNICORN = (2, 1, 4)

# Byte offsets inside the uc_context blob (header of 40 bytes + CPUX86State).
HFLAGS = 216
SEGMENTS = 224  # SegmentCache[6] (ES CS SS DS FS GS), then LDT, TR, GDT, IDT; 24 bytes each
SEGMENT_SIZE = 24
CR0 = 464
EFER = 632
ERROR_CODE = 5424  # int error_code
EXCEPTION_IS_INT = 5428  # int: 1 for int n / int3 / into
EXCEPTION_NEXT_EIP = 5432  # u64
OLD_EXCEPTION = 5536  # int: QEMU's double-fault tracking, never reset by unicorn
TSC_OFFSET = 5552  # u64 added to the host TSC by RDTSC

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

# struct uc_struct (uc_priv.h): the run of fields
#   u32 target_page_size, u32 target_page_align, u64 qemu_host_page_size,
#   u64 qemu_real_host_page_size, int qemu_icache_linesize, int context_content,
#   int cpu_context_size, u64 next_pc, bool hook_insert, bool first_tb,
#   bool no_exit_request, bool init_done
# is found by its values; no_exit_request is 50 bytes after its start.
_UC_ANCHOR = struct.Struct("<IIQQiii")
NO_EXIT_REQUEST_FROM_ANCHOR = 50
INIT_DONE_FROM_ANCHOR = 51
# Earlier in uc_struct: ..., u64 timeout, u64 invalid_addr, int invalid_error.
INVALID_ADDR_FROM_ANCHOR = -568
INVALID_ERROR_FROM_ANCHOR = -560

# HLT leaves no trace in the CPU state unicorn exposes: emu_start returns OK as for a stop.
# QEMU's CPUState.halted says it (set by hlt, cleared by every emu_start). Offsets:
UC_CPU_POINTER = 0x1B8  # uc_struct.cpu
CPU_HALTED = 0x8198  # CPUState.halted (u32)
CPU_UC_POINTER = 0x81A8  # CPUState.uc, points back to the uc_struct
CPU_EXIT_REQUEST = 0x15  # CPUState.exit_request (bool)
CPU_ENV_POINTER = 0x128  # CPUState.env_ptr: X86CPU.env, 16 bytes after X86CPU.neg
CPU_ICOUNT_DECR_POINTER = 0x130  # CPUState.icount_decr_ptr: X86CPU.neg.icount_decr (u16 low, u16 high)

#: What ``emu_start`` raises after a ``BlockExit.request``: an error code unicorn itself
#: only uses for resource exhaustion at set-up, never during emulation.
STOPPED_ERROR = UC_ERR_RESOURCE


class Blob:
    """A saved context, patched in place and loaded back with ``restore``."""

    __slots__ = ("uc", "context", "address")

    def __init__(self, uc: Uc):
        self.uc = uc
        self.context = uc.context_save()
        self.address = ctypes.cast(self.context.context, ctypes.c_void_p).value

    def _buffer(self, offset: int, size: int):
        return (ctypes.c_char * size).from_address(self.address + offset)

    def read(self, fmt: str, offset: int):
        return struct.unpack_from(fmt, self._buffer(offset, struct.calcsize(fmt)))

    def write(self, fmt: str, offset: int, *values) -> None:
        struct.pack_into(fmt, self._buffer(offset, struct.calcsize(fmt)), 0, *values)

    def segment(self, index: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of segment cache ``index``."""
        return _SEGMENT.unpack_from(self._buffer(SEGMENTS + SEGMENT_SIZE * index, SEGMENT_SIZE))

    def set_segment(self, index: int, selector: int, base: int, limit: int, flags: int) -> None:
        _SEGMENT.pack_into(
            self._buffer(SEGMENTS + SEGMENT_SIZE * index, SEGMENT_SIZE),
            0,
            selector & 0xFFFF,
            base & 0xFFFFFFFFFFFFFFFF,
            limit & 0xFFFFFFFF,
            flags & 0xFFFFFFFF,
        )

    @property
    def hflags(self) -> int:
        return self.read("<I", HFLAGS)[0]

    @hflags.setter
    def hflags(self, value: int) -> None:
        self.write("<I", HFLAGS, value)

    def restore(self) -> None:
        self.uc.context_restore(self.context)


def disable_midblock_exits(uc: Uc) -> None:
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
    flags = _uc_anchor(uc)
    if ctypes.c_uint8.from_address(flags + INIT_DONE_FROM_ANCHOR).value != 1:
        _fail("uc_struct init_done is not where expected")
    if ctypes.c_uint8.from_address(flags + NO_EXIT_REQUEST_FROM_ANCHOR).value != 0:
        _fail("uc_struct no_exit_request is not where expected")
    ctypes.c_uint8.from_address(flags + NO_EXIT_REQUEST_FROM_ANCHOR).value = 1


def _uc_anchor(uc: Uc) -> int:
    """Address of ``uc_struct.target_page_size``, found by the values of the fields after it."""
    base = ctypes.cast(uc._uch, ctypes.c_void_p).value
    size = 0x4000
    raw = ctypes.string_at(base, size)
    context_bytes = uc.context_save().size
    found = []
    for offset in range(0, size - 64, 4):
        page, align, host_page, real_page, _, content, cpu_context = _UC_ANCHOR.unpack_from(raw, offset)
        if page == 4096 and align == 4095 and host_page == real_page == 4096 and content == 1:
            if 0 < cpu_context < context_bytes:
                found.append(offset)
    if len(found) != 1:
        _fail(f"uc_struct run-state fields not found ({len(found)} candidates)")
    return base + found[0]


def _cpu_state(uc: Uc) -> int:
    """Address of the engine's QEMU ``CPUState`` (the engine must be initialised)."""
    base = ctypes.cast(uc._uch, ctypes.c_void_p).value
    cpu = ctypes.c_uint64.from_address(base + UC_CPU_POINTER).value
    if not cpu or ctypes.c_uint64.from_address(cpu + CPU_UC_POINTER).value != base:
        _fail("CPUState is not where expected")
    if (ctypes.c_int32.from_address(cpu).value, ctypes.c_int32.from_address(cpu + 4).value) != (1, 1):
        _fail("CPUState nr_cores/nr_threads are not where expected")
    return cpu


def halted_flag(uc: Uc) -> ctypes.c_uint32:
    """QEMU's ``CPUState.halted`` of this engine: 1 after ``hlt`` until the next emu_start."""
    return ctypes.c_uint32.from_address(_cpu_state(uc) + CPU_HALTED)


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

    def __init__(self, uc: Uc):
        cpu = _cpu_state(uc)
        icount = ctypes.c_uint64.from_address(cpu + CPU_ICOUNT_DECR_POINTER).value
        env = ctypes.c_uint64.from_address(cpu + CPU_ENV_POINTER).value
        if not icount or env - icount != 0x10 or not 0 < icount - cpu < 0x10000:
            _fail("CPUState icount_decr_ptr/env_ptr are not where expected")
        self._invalid_error = ctypes.c_int32.from_address(_uc_anchor(uc) + INVALID_ERROR_FROM_ANCHOR)
        self._exit_request = ctypes.c_uint8.from_address(cpu + CPU_EXIT_REQUEST)
        self._icount_high = ctypes.c_int16.from_address(icount + 2)

    def request(self) -> None:
        self._invalid_error.value = STOPPED_ERROR
        self._exit_request.value = 1
        self._icount_high.value = -1


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


def check_version() -> None:
    import unicorn

    version = getattr(unicorn, "__version__", "unknown")
    if version != ".".join(map(str, SUPPORTED_UNICORN)):
        raise AccelError(
            "interp",
            f"unicorn version/layout not supported: found {version}, need "
            f"{'.'.join(map(str, SUPPORTED_UNICORN))} (pip install unicorn==2.1.4)",
        )


def verify_layout() -> None:
    """Check every context offset pyvmm relies on against a known state, in a scratch engine."""
    check_version()
    try:
        _verify_layout()
    except UcError as err:
        raise AccelError("interp", f"unicorn version/layout not supported: layout probe failed: {err}") from err


def _fail(what: str) -> None:
    raise AccelError("interp", f"unicorn version/layout not supported: {what}")


def _verify_layout() -> None:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    page = ctypes.create_string_buffer(0x2000)
    uc.mem_map_ptr(0, 0x2000, UC_PROT_ALL, ctypes.addressof(page))

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
    if blob.read("<Q", CR0)[0] != uc.reg_read(x86.UC_X86_REG_CR0):
        _fail("CR0 offset does not match")
    if blob.read("<Q", EFER)[0] != uc.reg_read(x86.UC_X86_REG_MSR, 0xC0000080):
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
    uc.emu_start(0x100, 1 << 63)
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
    uc.emu_start(0x200, 1 << 63)
    page[0x300:0x302] = b"\xcd\x80"
    uc.emu_start(0x300, 1 << 63)
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
    uc.emu_start(0x400, 1 << 63)
    tsc = (uc.reg_read(x86.UC_X86_REG_EDX) << 32) | uc.reg_read(x86.UC_X86_REG_EAX)
    if tsc < (1 << 60):
        _fail("TSC offset does not match")
    _verify_stops_are_exact()


def _verify_stops_are_exact() -> None:
    """Stops from another thread must never re-execute an instruction nor skip a hook."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    page = ctypes.create_string_buffer(0x2000)
    uc.mem_map_ptr(0, 0x2000, UC_PROT_ALL, ctypes.addressof(page))
    disable_midblock_exits(uc)
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])

    # uc_struct.invalid_addr / invalid_error (BlockExit writes the latter): an unmapped fetch fills them.
    anchor = _uc_anchor(uc)
    try:
        uc.emu_start(0x7654321000, 0)
    except UcError:
        pass
    if ctypes.c_uint64.from_address(anchor + INVALID_ADDR_FROM_ANCHOR).value != 0x7654321000:
        _fail("uc_struct invalid_addr is not where expected")
    if ctypes.c_int32.from_address(anchor + INVALID_ERROR_FROM_ANCHOR).value != 0:
        _fail("uc_struct invalid_error is not where expected")
    stopper = BlockExit(uc)

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
    halted = halted_flag(uc)
    if halted.value != 0:
        _fail("CPUState.halted is set after a stop")
    page[0x200:0x202] = b"\x90\xf4"
    uc.emu_start(0x200, 0)
    if halted.value != 1 or uc.reg_read(x86.UC_X86_REG_RIP) != 0x202:
        _fail("CPUState.halted is not set by hlt")
    timer = threading.Timer(0.002, stopper.request)
    timer.start()
    try:
        uc.emu_start(0x100, 0)  # the counting loop again, until the timer's stop
    except UcError as err:
        if err.errno != STOPPED_ERROR:
            raise
    else:
        _fail("a BlockExit request did not end emu_start with STOPPED_ERROR")
    timer.join()
    if halted.value != 0:
        _fail("CPUState.halted is not cleared by emu_start")
