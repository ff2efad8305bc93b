"""unicorn helpers redirected to the vCPU: RDMSR, WRMSR, MOV CR4/CR8, and the interrupt window.

unicorn 2.1.4 has no hook for these instructions, and gets them wrong for a VMM: its MSR helpers
read IA32_APIC_BASE as 0, ignore IA32_TSC writes and read every MSR they do not know as 0; its CR8
helpers read 0 and keep writes to themselves, where CR8 is the local APIC's task priority
(../shared/notes/unicorn-system-mode.md). The helpers are exported symbols of libunicorn
(``helper_rdmsr_x86_64``, ``helper_wrmsr_x86_64``, ``helper_read_crN_x86_64``,
``helper_write_crN_x86_64``), and the code TCG generates calls them with ``env`` (the vCPU's
``CPUX86State``, whose first fields are the general registers) after setting ``env->eip`` to the
instruction. So pyvmm writes a 12-byte jump at each helper's entry to a small machine-code shim
(x86-64 System V, written here byte by byte: no compiler at run time). The shim calls the
helper's Python dispatcher (the CR shims only for register 8; CR0/CR3/CR4 stay in machine code)
and then, by its answer:

* ``HANDLED``: returns to the translated code with the value the handler gave (MOV from CR8) or
  with EAX/EDX set by it (RDMSR);
* ``NATIVE``: runs the helper's own first instructions (copied into the shim, checked to be
  position-independent) and jumps to the rest of the helper: unicorn's behaviour, unchanged;
* ``GENERAL_PROTECTION``: tail-calls ``raise_exception_err_ra(env, 13, 0, return address)``, which
  raises #GP at the instruction as the CPU does (the return address into the translated block is
  what QEMU's unwinder needs, and the shim leaves it on the stack).

POPF and IRET (``_WATCHED``) are redirected the same way to tell a vCPU that waits (``watch``)
that IF may be set or NMI blocking ends: unicorn has no hook on them, so a pending interrupt
otherwise waited for a timed retry, and NMIs could not be blocked until IRET. (STI is not: its
window opens one instruction later, where no stop can be placed; the timed retry stays for it.) Their shims test a
flag first, so while nobody waits they cost a compare.

It is done once per process (``install``). Engines without a handler (the fallback's stepper) keep
unicorn's behaviour. Where a helper's first bytes are not what this module can move (another
unicorn build) nothing is patched and ``unavailable_reason()`` says why; the interpreter then runs
with unicorn's MSRs and CR8, as before.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import struct
import sys
import threading
from typing import Protocol

HANDLED, NATIVE, GENERAL_PROTECTION = 0, 1, 2
GP_VECTOR = 13
ENTRY_JUMP_SIZE = 12  # movabs rax, imm64; jmp rax
CR4, CR8 = 4, 8
IF = 1 << 9

log = logging.getLogger("pyvmm.interp")


class Handler(Protocol):
    """What a vCPU gives for its engine (all called on the engine thread, mid-instruction)."""

    def guest_rdmsr(self, msr: int) -> tuple[int, int]: ...  # (outcome, value)

    def guest_wrmsr(self, msr: int, value: int) -> int: ...  # outcome

    def guest_read_cr8(self) -> int: ...

    def guest_write_cr8(self, value: int) -> int: ...  # outcome

    def guest_write_cr4(self, value: int) -> int: ...  # outcome (NATIVE: unicorn writes it)

    def guest_if_set(self) -> None: ...  # POPF setting IF: about to run

    def guest_iret(self) -> None: ...  # IRET: about to run


# int dispatch(env, rsi, rdx, uint64_t *out)
_DISPATCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64,
                             ctypes.POINTER(ctypes.c_uint64))  # fmt: skip
_lock = threading.Lock()
_handlers: dict[int, Handler] = {}
_watching: set[int] = set()
_state: dict = {}  # "installed", "reason", and what must stay alive (callbacks, the shim page)


def register(env_address: int, handler: Handler) -> None:
    """Route the accesses of the engine whose ``CPUX86State`` is at ``env_address``."""
    _handlers[env_address] = handler


def unregister(env_address: int) -> None:
    _handlers.pop(env_address, None)
    watch(env_address, False)


def watch(env_address: int, on: bool) -> None:
    """While any engine watches, POPF and IRET call its ``guest_if_set``/``guest_iret``: an
    interrupt waits for IF, or an NMI for the IRET that ends NMI blocking."""
    with _lock:
        (_watching.add if on else _watching.discard)(env_address)
        flag = _state.get("watch_flag")
        if flag is not None:
            flag.value = 1 if _watching else 0


def installed() -> bool:
    return bool(_state.get("installed"))


def unavailable_reason() -> str | None:
    return None if installed() else _state.get("reason", "not installed yet")


def _guarded(name: str, call):
    """A dispatcher: an exception cannot cross the engine's C frames, so it becomes a #GP."""

    def dispatch(env: int, rsi: int, rdx: int, out) -> int:
        handler = _handlers.get(env)
        if handler is None:
            return NATIVE
        try:
            return call(handler, env, rsi, rdx, out)
        except BaseException:
            log.exception("the %s handler failed; the guest gets #GP", name)
            return GENERAL_PROTECTION

    return dispatch


def _rdmsr(handler: Handler, env: int, rsi: int, rdx: int, out) -> int:
    regs = (ctypes.c_uint64 * 3).from_address(env)  # RAX, RCX, RDX
    outcome, value = handler.guest_rdmsr(regs[1] & 0xFFFFFFFF)
    if outcome == HANDLED:
        regs[0] = value & 0xFFFFFFFF
        regs[2] = (value >> 32) & 0xFFFFFFFF
    return outcome


def _wrmsr(handler: Handler, env: int, rsi: int, rdx: int, out) -> int:
    regs = (ctypes.c_uint64 * 3).from_address(env)
    return handler.guest_wrmsr(regs[1] & 0xFFFFFFFF, (regs[0] & 0xFFFFFFFF) | (regs[2] & 0xFFFFFFFF) << 32)


def _read_cr(handler: Handler, env: int, reg: int, rdx: int, out) -> int:
    out[0] = handler.guest_read_cr8()
    return HANDLED


def _write_cr(handler: Handler, env: int, reg: int, value: int, out) -> int:
    return handler.guest_write_cr8(value) if reg == CR8 else handler.guest_write_cr4(value)


def _write_eflags(handler: Handler, env: int, value: int, mask: int, out) -> int:
    if value & mask & IF:
        handler.guest_if_set()
    return NATIVE


def _iret(handler: Handler, env: int, rsi: int, rdx: int, out) -> int:
    handler.guest_iret()
    return NATIVE


#: helpers that only tell the vCPU an interrupt window may open (NMI blocking ends at IRET): they
#: call Python only while some vCPU ``watch``es, else they run as unicorn's at machine-code cost
_WATCHED = {
    # not STI: the window opens after the instruction STI shadows, and a stop can only land before
    # it (in the shadow); stopping there at every STI starved ``sti; pause; cli`` idle loops
    "helper_write_eflags_x86_64": _guarded("POPF", _write_eflags),
    "helper_iret_protected_x86_64": _guarded("IRET", _iret),
    "helper_iret_real_x86_64": _guarded("IRET", _iret),
}

#: helper symbol -> (dispatcher, the register numbers in ESI it is limited to: others stay in machine code)
_HELPERS = {
    "helper_rdmsr_x86_64": (_guarded("RDMSR", _rdmsr), ()),
    "helper_wrmsr_x86_64": (_guarded("WRMSR", _wrmsr), ()),
    "helper_read_crN_x86_64": (_guarded("MOV from CR8", _read_cr), (CR8,)),
    "helper_write_crN_x86_64": (_guarded("MOV to CR4/CR8", _write_cr), (CR4, CR8)),
}


def install(library: ctypes.CDLL) -> bool:
    """Redirect the helpers of ``library`` (libunicorn), once per process; False (with
    ``unavailable_reason()``) where this build or host does not allow it."""
    with _lock:
        if "installed" not in _state:
            try:
                _state.update(_install(library), installed=True)
            except Exception as err:  # noqa: BLE001 - any failure leaves unicorn's own helpers in place
                _state.update(installed=False, reason=str(err))
                log.warning("interpreter: RDMSR/WRMSR/CR8 stay unicorn's: %s", err)
        return _state["installed"]


def _install(library: ctypes.CDLL) -> dict:
    if sys.platform not in ("linux", "darwin") or struct.calcsize("P") != 8:
        raise ValueError("the helper shims are written for x86-64 System V hosts (Linux, macOS)")
    raise_ra = _address(library, "raise_exception_err_ra_x86_64")
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page_address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    callbacks, entries, offset = [], {}, 0
    flag_address = page_address + len(page) - 8  # the watch flag: the page's last word
    plan = [(symbol, dispatch, only_regs, None) for symbol, (dispatch, only_regs) in _HELPERS.items()]
    plan += [(symbol, dispatch, (), flag_address) for symbol, dispatch in _WATCHED.items()]
    for symbol, dispatch, only_regs, flag in plan:  # check and build all before patching any
        helper = _address(library, symbol)
        callback = _DISPATCH(dispatch)
        callbacks.append(callback)
        prologue, whole = _movable_prologue(helper, symbol)
        code = _shim(ctypes.cast(callback, ctypes.c_void_p).value, only_regs, prologue, whole, helper, raise_ra, flag)
        if offset + len(code) > flag_address - page_address:
            raise ValueError("the helper shims do not fit in one page")
        page[offset : offset + len(code)] = code
        entries[helper] = page_address + offset
        offset += (len(code) + 15) & ~15
    for helper, shim in entries.items():
        _write_code(helper, b"\x48\xb8" + struct.pack("<Q", shim) + b"\xff\xe0")  # movabs rax, shim; jmp rax
    return {"callbacks": callbacks, "page": page, "watch_flag": ctypes.c_uint8.from_address(flag_address)}


def _address(library: ctypes.CDLL, symbol: str) -> int:
    return ctypes.cast(getattr(library, symbol), ctypes.c_void_p).value


def _movable_prologue(helper: int, symbol: str) -> tuple[bytes, bool]:
    """Whole instructions from the helper's entry covering ENTRY_JUMP_SIZE bytes, none relative, and
    whether they are the whole helper (it ends in their ``ret``)."""
    import capstone
    from capstone import x86 as cs_x86

    head = ctypes.string_at(helper, 64)
    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    disassembler.detail = True
    size = 0
    for insn in disassembler.disasm(head, helper):
        if insn.mnemonic == "ret" and not insn.op_str:  # a whole short helper (helper_sti): copied, no way back
            if size + insn.size < ENTRY_JUMP_SIZE:
                raise ValueError(f"{symbol} is {size + insn.size} bytes long, too short for the entry jump")
            return head[: size + insn.size], True
        branch = any(insn.group(g) for g in (capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL, capstone.CS_GRP_RET))
        rip_relative = any(op.type == cs_x86.X86_OP_MEM and op.mem.base == cs_x86.X86_REG_RIP for op in insn.operands)
        if branch or rip_relative:
            raise ValueError(f"{symbol} starts with '{insn.mnemonic} {insn.op_str}', which cannot be moved")
        size += insn.size
        if size >= ENTRY_JUMP_SIZE:
            return head[:size], False
    raise ValueError(f"{symbol}: its first bytes do not disassemble")


def _shim(callback: int, only_regs: tuple[int, ...], prologue: bytes, whole: bool, helper: int, raise_ra: int,
          flag: int | None = None) -> bytes:  # fmt: skip
    """The shim's machine code:

        [movabs rax, flag; cmp byte [rax], 0; je native]    ; watched helpers: nobody watches
        [cmp esi, reg1; je go; cmp esi, reg2; je go; ...; jmp native; go:]
        push rdi; push rsi; push rdx; sub rsp, 16      ; the arguments kept, an out slot, aligned
        mov rcx, rsp; movabs rax, callback; call rax   ; dispatch(env, rsi, rdx, &slot)
        mov r11, [rsp]; add rsp, 16; pop rdx; pop rsi; pop rdi
        cmp eax, NATIVE; je native; cmp eax, GENERAL_PROTECTION; je gp
        mov rax, r11; ret                              ; HANDLED: the slot is the result
    native:
        <the helper's first instructions>; movabs r11, helper + len; jmp r11
    gp:
        mov rcx, [rsp]; mov esi, 13; xor edx, edx; movabs r11, raise_exception_err_ra; jmp r11
    """
    code = bytearray()
    jumps_to_native = []
    if flag is not None:
        code += b"\x48\xb8" + struct.pack("<Q", flag) + b"\x80\x38\x00\x0f\x84" + bytes(4)
        jumps_to_native.append(len(code))
    if only_regs:
        for reg in only_regs:  # cmp esi, reg; je go (rel8, patched below)
            code += b"\x83\xfe" + bytes([reg]) + b"\x74\x00"
        to_go = [len(code) - 5 * i - 1 for i in range(len(only_regs))]
        code += b"\xe9" + bytes(4)  # jmp native (rel32)
        jumps_to_native.append(len(code))
        for at in to_go:
            code[at] = len(code) - (at + 1)
    code += b"\x57\x56\x52\x48\x83\xec\x10"  # push rdi; push rsi; push rdx; sub rsp, 16
    code += b"\x48\x89\xe1\x48\xb8" + struct.pack("<Q", callback) + b"\xff\xd0"  # mov rcx, rsp; movabs; call
    code += b"\x4c\x8b\x1c\x24\x48\x83\xc4\x10\x5a\x5e\x5f"  # mov r11, [rsp]; add rsp, 16; pop x3
    code += b"\x83\xf8" + bytes([NATIVE]) + b"\x0f\x84" + bytes(4)  # cmp eax, NATIVE; je rel32
    jumps_to_native.append(len(code))
    code += b"\x83\xf8" + bytes([GENERAL_PROTECTION]) + b"\x0f\x84" + bytes(4)  # je gp
    jump_to_gp = len(code)
    code += b"\x4c\x89\xd8\xc3"  # mov rax, r11; ret
    native = len(code)
    code += prologue
    if not whole:  # a whole helper returned by itself
        code += b"\x49\xbb" + struct.pack("<Q", helper + len(prologue)) + b"\x41\xff\xe3"
    gp = len(code)
    code += b"\x48\x8b\x0c\x24\xbe" + struct.pack("<I", GP_VECTOR) + b"\x31\xd2"
    code += b"\x49\xbb" + struct.pack("<Q", raise_ra) + b"\x41\xff\xe3"
    for end in jumps_to_native:
        code[end - 4 : end] = struct.pack("<i", native - end)
    code[jump_to_gp - 4 : jump_to_gp] = struct.pack("<i", gp - jump_to_gp)
    return bytes(code)


def _write_code(address: int, code: bytes) -> None:
    """Write over the library's code: its page made writable for the write, executable again after."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    start = address & ~(mmap.PAGESIZE - 1)
    length = address + len(code) - start
    if libc.mprotect(start, length, mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC) != 0:
        raise OSError(ctypes.get_errno(), "mprotect of libunicorn's code failed")
    try:
        ctypes.memmove(address, code, len(code))
    finally:
        libc.mprotect(start, length, mmap.PROT_READ | mmap.PROT_EXEC)
