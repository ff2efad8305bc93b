"""Stopping a running unicorn engine from another thread (accel/interp/engine.BlockExit).

The interpreter stops its engine from a kicker thread for every timer tick and
interrupt. unicorn's own ``emu_stop`` sets a flag that makes the ``syscall``
and ``cpuid`` helpers skip their hooks (the instruction then does nothing);
Linux showed it as short ``write()``s. These tests run the stop mechanism the
backend uses against loops whose result counts every instruction and hook.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time

import pytest

unicorn = pytest.importorskip("unicorn")

from unicorn import UC_HOOK_INSN, UC_PROT_ALL, UcError  # noqa: E402
from unicorn import x86_const as x86  # noqa: E402

from pyvmm.accel.interp import engine as ctx  # noqa: E402

# A delay loop (edx), then one long translation block ending in "inc rbx; <insn>", then back:
# a stop landing inside that block reaches the helper of <insn> with the stop already pending.
DELAY = bytes.fromhex("bad0070000 ffca 75fc")  # mov edx, 2000; 1: dec edx; jnz 1b
LONG_BLOCK = bytes.fromhex("48ffc0") * 400  # inc rax x 400
SYSCALL = bytes.fromhex("0f05")
CPUID = bytes.fromhex("0fa2")


def _engine():
    """An engine prepared for stops from other threads, as the interpreter vCPU's."""
    uc = ctx.Engine(async_stops=True).uc
    memory = ctypes.create_string_buffer(0x4000)
    uc.mem_map_ptr(0, 0x4000, UC_PROT_ALL, ctypes.addressof(memory))
    return uc, memory


def _loop(insn: bytes) -> bytes:
    body = DELAY + LONG_BLOCK + bytes.fromhex("48ffc3") + insn  # ... inc rbx; insn
    return body + b"\xe9" + (-(len(body) + 5)).to_bytes(4, "little", signed=True)


def _run_with_stops(uc, start: int, stops: int) -> int:
    """Run from ``start`` until ``stops`` BlockExit stops have ended emu_start; return the RIP."""
    block_exit = ctx.BlockExit(uc)
    done = threading.Event()

    def kicker():
        while not done.is_set():
            block_exit.request()
            time.sleep(0.00005)

    thread = threading.Thread(target=kicker, daemon=True)
    thread.start()
    rip = start
    try:
        for _ in range(stops):
            with pytest.raises(UcError) as stopped:
                uc.emu_start(rip, 0)
            assert stopped.value.errno == ctx.STOPPED_ERROR
            rip = uc.reg_read(x86.UC_X86_REG_RIP)
    finally:
        done.set()
        thread.join()
    return rip


def test_no_syscall_hook_is_skipped_under_stops():
    uc, memory = _engine()
    uc.hook_add(UC_HOOK_INSN, lambda *_: 0, None, 1, 0, x86.UC_X86_INS_IN)  # listed before the syscall hook
    calls = []
    uc.hook_add(UC_HOOK_INSN, lambda uc, _: calls.append(1), None, 1, 0, x86.UC_X86_INS_SYSCALL)
    code = _loop(SYSCALL)
    memory[0x100 : 0x100 + len(code)] = code
    _run_with_stops(uc, 0x100, 1500)
    executed = uc.reg_read(x86.UC_X86_REG_RBX)
    assert executed > 100
    # the hook runs exactly once per syscall, and RBX counts syscalls reached (+1 if stopped between)
    assert len(calls) in (executed, executed - 1)


def test_no_cpuid_hook_is_skipped_under_stops():
    uc, memory = _engine()
    uc.hook_add(UC_HOOK_INSN, lambda *_: 0, None, 1, 0, x86.UC_X86_INS_IN)
    calls = []

    def on_cpuid(uc, _):
        calls.append(1)
        uc.reg_write(x86.UC_X86_REG_RAX, 0x1234)
        return 1  # skip unicorn's own CPUID model

    uc.hook_add(UC_HOOK_INSN, on_cpuid, None, 1, 0, x86.UC_X86_INS_CPUID)
    # the loop body stores EAX after each cpuid: a cpuid from unicorn's model would leave another value
    code = _loop(CPUID + bytes.fromhex("89042500300000"))  # mov [0x3000], eax
    memory[0x100 : 0x100 + len(code)] = code
    _run_with_stops(uc, 0x100, 1500)
    executed = uc.reg_read(x86.UC_X86_REG_RBX)
    assert executed > 100
    assert len(calls) in (executed, executed - 1)
    assert struct.unpack_from("<I", memory, 0x3000)[0] == 0x1234


def test_stops_never_repeat_a_memory_update():
    uc, memory = _engine()
    code = bytes.fromhex("48ffc1 ff042500200000 ebf4")  # 1: inc rcx; incl [0x2000]; jmp 1b
    memory[0x100 : 0x100 + len(code)] = code
    rip = _run_with_stops(uc, 0x100, 500)
    assert rip in (0x100, 0x103, 0x10A)
    count = struct.unpack_from("<I", memory, 0x2000)[0]
    loops = uc.reg_read(x86.UC_X86_REG_RCX)
    assert count in (loops, loops - 1)  # stopped after "inc rcx" at most once ahead
    assert loops > 1000


def test_a_request_between_runs_does_not_end_the_next_run_early_or_leak():
    uc, memory = _engine()
    block_exit = ctx.BlockExit(uc)
    memory[0x100:0x107] = bytes.fromhex("48ffc0 48ffc0 f4")  # inc rax; inc rax; hlt
    block_exit.request()  # no emulation running: dropped at the next emu_start
    uc.emu_start(0x100, 0)  # runs to hlt and returns normally
    assert uc.reg_read(x86.UC_X86_REG_RAX) == 2
    assert uc.reg_read(x86.UC_X86_REG_RIP) == 0x107


def test_emu_stop_from_another_thread_skips_hooks_which_is_why_blockexit_exists():
    """Documents the unicorn 2.1.4 behaviour BlockExit avoids (a stop already pending at the helper)."""
    uc, memory = _engine()

    def on_in(uc, port, size, _):
        uc.emu_stop()  # a stop pending when the following syscall's helper runs
        return 0

    uc.hook_add(UC_HOOK_INSN, on_in, None, 1, 0, x86.UC_X86_INS_IN)
    calls = []
    uc.hook_add(UC_HOOK_INSN, lambda uc, _: calls.append(1), None, 1, 0, x86.UC_X86_INS_SYSCALL)
    memory[0x100:0x106] = bytes.fromhex("e410 0f05 f4f4")  # in al, 0x10; syscall; hlt
    uc.emu_start(0x100, 0)
    assert uc.reg_read(x86.UC_X86_REG_RIP) == 0x104  # the syscall was passed over ...
    assert calls == []  # ... without its hook
