"""accel/interp/redirect.py without a guest: what it refuses to move, and the shim it writes.

The redirection itself is exercised by test_interp_cpu.py (a guest's RDMSR, WRMSR and CR8)."""

from __future__ import annotations

import ctypes
import struct

import pytest

pytest.importorskip("capstone")

from pyvmm.accel.interp import redirect  # noqa: E402


def _at(code: bytes):
    buffer = ctypes.create_string_buffer(code + bytes(64 - len(code)))
    return buffer, ctypes.addressof(buffer)


@pytest.mark.parametrize("code, what", [(b"\xe8\x00\x00\x00\x00" + b"\x90" * 16, "call"),
                                        (b"\x48\x8b\x05\x10\x00\x00\x00" + b"\x90" * 8, "rip"),
                                        (b"\x53\x74\x05" + b"\x90" * 16, "je")])  # fmt: skip
def test_a_helper_starting_with_a_relative_instruction_is_left_alone(code, what):
    buffer, address = _at(code)
    with pytest.raises(ValueError, match=f"helper_x starts with '.*{what}.*', which cannot be moved"):
        redirect._movable_prologue(address, "helper_x")


def test_whole_instructions_covering_the_entry_jump_are_copied():
    # push rbx; mov rcx, [rsp+8]; mov rbx, rdi; xor edx, edx; mov esi, 0x7c  (helper_rdmsr's start)
    code = b"\x53\x48\x8b\x4c\x24\x08\x48\x89\xfb\x31\xd2\xbe\x7c\x00\x00\x00"
    buffer, address = _at(code)
    # 1 + 5 + 3 + 2 = 11 bytes fall short of the 12-byte jump: the fifth instruction comes too
    assert redirect._movable_prologue(address, "helper_x") == (code, False)


def test_a_whole_helper_ending_in_ret_is_copied_and_a_shorter_one_refused():
    sti = b"\x48\x81\x8f\x88\x00\x00\x00\x00\x02\x00\x00\xc3"  # orq $0x200, 0x88(%rdi); ret
    buffer, address = _at(sti + b"\x0f\x1f\x40\x00")
    assert redirect._movable_prologue(address, "helper_x") == (sti, True)
    buffer, address = _at(b"\x31\xc0\xc3" + b"\x90" * 16)  # xor eax, eax; ret
    with pytest.raises(ValueError, match="helper_x is 3 bytes long, too short"):
        redirect._movable_prologue(address, "helper_x")


def test_tsc_deadline_is_offered_only_where_the_helpers_are_redirected(monkeypatch):
    """Without the redirection (another unicorn build, Windows) IA32_TSC_DEADLINE writes would be
    lost and a guest using the deadline timer would wait for ever (seen: Linux in the macOS
    simulation, test_non_linux_simulation.py): CPUID.1:ECX[24] is offered only with it."""
    pytest.importorskip("unicorn")
    from pyvmm.accel.interp import cpuid

    def leaf1_ecx():
        return next(e.ecx for e in cpuid.supported_cpuid(25_000_000) if e.function == 1)

    assert leaf1_ecx() >> 24 & 1
    monkeypatch.setattr(cpuid, "helpers_redirected", lambda: False)
    assert not leaf1_ecx() >> 24 & 1
