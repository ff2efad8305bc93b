"""Debian's gdb against ``pyvmm boot --gdb`` on the Hypervisor.framework and WHPX backends, each on its fake.

The same sessions as tests/integration/test_gdb_guests.py (break at a symbol, stepi, set a register,
detach; a hardware watchpoint; threads), with the child ``pyvmm`` routed to the platform's fake
through tests/fakes/boot/sitecustomize.py (``PYVMM_FAKE_PLATFORM``). The stub drives the backends'
``set_guest_debug``: single steps are RFLAGS.TF with #DB intercepted, gdb's breakpoints are int3s
with #BP intercepted (HVF: the VMCS exception bitmap; WHPX: ExceptionExitBitmap), watchpoints DR0-DR3
with DR7. The fakes raise those exceptions as the CPU does (tests/fakes/cpu.py), except that a data
breakpoint's trap comes at the end of its translation block there (fakes/cpu.py's text), which
changes no value gdb reports.
"""

from __future__ import annotations

import os

import pytest

import test_gdb_guests as guests
from conftest import FAKES_BOOT

pytestmark = guests.pytestmark


@pytest.fixture(params=["hvf", "whpx"])
def accel_name(request, monkeypatch):
    monkeypatch.setenv("PYVMM_FAKE_PLATFORM", request.param)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKES_BOOT), os.environ.get("PYTHONPATH")])))
    return request.param


def test_break_at_a_symbol_step_set_a_register_and_detach(tmp_path, accel_name):
    """gdb's int3 at main (#BP intercepted), three stepi (TF, one instruction each), a breakpoint
    further on, a register write and a detach: the guest exits with the status gdb set."""
    guests.test_break_at_a_symbol_step_set_a_register_and_detach(tmp_path, accel_name)


def test_a_hardware_watchpoint_triggers_on_a_store(tmp_path, accel_name):
    """``watch`` is DR0 with DR7 R/W 01 (a #DB trap after the store, DR6.B0): two stops, one increment each."""
    guests.test_a_hardware_watchpoint_triggers_on_a_store(tmp_path, accel_name)


def test_info_threads_lists_one_thread_per_vcpu(tmp_path, accel_name):
    guests.test_info_threads_lists_one_thread_per_vcpu(tmp_path, accel_name)
