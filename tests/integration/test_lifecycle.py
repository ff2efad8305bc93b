"""Pause and resume through the VM controller, on every backend (the `backend` fixture).

The counter guest (tests/guests/counter.S) counts in guest RAM at 0x7000 until the
host writes a status byte to 0x7008. While paused the counter must not move, on
every vCPU and backend; after resume it moves again; the events (callbacks, the
iterator and the JSON-lines journal) follow the lifecycle table (vmm/states.py).
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from conftest import GUESTS
from pyvmm.api import VM
from pyvmm.vmm.states import TransitionError, VmState

COUNTER, STOP = 0x7000, 0x7008


def _counter_vm(backend, tmp_path, vcpus=1):
    config = {"machine": {"vcpus": vcpus, "memory_mib": 64, "accel": backend},
              "boot": {"kernel": str(GUESTS / "counter.elf"), "cmdline": "console=ttyS0"}}  # fmt: skip
    return VM.from_dict(config, journal=tmp_path / "journal.jsonl")


def _count(vm) -> int:
    return vm.machine.memory.read_int(COUNTER, 4)


def _wait_for_progress(vm, beyond: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = _count(vm)
        if value > beyond:
            return value
        time.sleep(0.01)
    raise AssertionError(f"the counter stayed at {_count(vm)} (expected more than {beyond})")


@pytest.mark.parametrize("vcpus", [1, 2])
def test_pause_holds_every_vcpu_and_resume_lets_the_guest_go_on(backend, tmp_path, vcpus):
    vm = _counter_vm(backend, tmp_path, vcpus)
    seen = []
    vm.controller.subscribe(seen.append)
    try:
        vm.start()
        vm.console.wait_for("counter: start", timeout=60)
        first = _wait_for_progress(vm, 0)
        vm.pause()
        assert vm.state is VmState.PAUSED and vm.machine.paused
        held = _count(vm)
        assert held >= first
        time.sleep(0.3)
        assert _count(vm) == held, "a paused guest must not run"
        vm.resume()
        assert vm.state is VmState.RUNNING
        _wait_for_progress(vm, held)
        vm.machine.memory.write_int(STOP, 1, 0x2A)
        status = vm.wait(60)
        assert status is not None and status.code == 0x2A, status
        assert "counter: stop" in vm.console.text
    finally:
        vm.close()
    assert [e.kind for e in seen] == ["started", "paused", "resumed", "stopped"]
    assert seen[0].detail == {"accel": backend, "vcpus": vcpus}
    assert seen[-1].reason == "debug-exit" and seen[-1].detail == {"code": 0x2A}
    journal = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert [entry["event"] for entry in journal] == ["configured", "started", "paused", "resumed", "stopped"]
    assert [entry["state"] for entry in journal] == ["Configured", "Running", "Paused", "Running", "Stopped"]


def test_a_stop_while_paused_ends_the_vm(backend, tmp_path):
    vm = _counter_vm(backend, tmp_path)
    try:
        vm.start()
        vm.console.wait_for("counter: start", timeout=60)
        vm.pause()
        started = time.monotonic()
        status = vm.stop()
        assert time.monotonic() - started < 5
        assert status.code == 0 and status.reason == "stopped by the host"
        assert vm.state is VmState.STOPPED
    finally:
        vm.close()


def test_actions_the_state_does_not_allow_are_one_line_errors(backend, tmp_path):
    vm = _counter_vm(backend, tmp_path)
    try:
        with pytest.raises(TransitionError, match=r"^cannot pause the VM: it is Configured \(allowed: configure, restore, start, stop\)$"):
            vm.pause()
        vm.start()
        with pytest.raises(TransitionError, match="cannot resume the VM: it is Running"):
            vm.resume()
        with pytest.raises(TransitionError, match="cannot start the VM: it is Running"):
            vm.start()
    finally:
        vm.close()


def test_the_events_iterator_ends_after_the_stop(backend, tmp_path):
    vm = _counter_vm(backend, tmp_path)
    kinds = []
    feed = vm.events(timeout=60)
    reader = threading.Thread(target=lambda: kinds.extend(e.kind for e in feed))
    reader.start()
    try:
        time.sleep(0.05)  # the iterator subscribes on its first next()
        vm.start()
        vm.console.wait_for("counter: start", timeout=60)
        vm.pause()
        vm.resume()
        vm.machine.memory.write_int(STOP, 1, 3)
        assert vm.wait(60).code == 3
    finally:
        vm.close()
    reader.join(10)
    assert not reader.is_alive()
    assert kinds == ["started", "paused", "resumed", "stopped"]
