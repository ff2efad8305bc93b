"""Snapshots: pause, write, restore in a fresh VM or process, on the same or another backend.

The counter guest (tests/guests/counter.S) counts in guest RAM; a restored guest
must go on from the value it had when paused, on every backend pair where the
state maps (``machine.cpu = "portable"``: the CPUID every backend here can run).
"""

from __future__ import annotations

import contextlib
import json
import signal
import struct
import time

import pytest

from conftest import GUESTS
from fakes import install
from pyvmm import accel
from pyvmm.api import VM
from pyvmm.vmm.snapshot import HEADER, SnapshotError
from pyvmm.vmm.states import TransitionError, VmState
from test_firecracker_process import UnixConnection, finish, read_until, request, spawn

COUNTER, STOP = 0x7000, 0x7008
PAIRS = [("interp", "interp"), ("kvm", "kvm"), ("interp", "kvm"), ("kvm", "interp"), ("hvf", "hvf"),
         ("whpx", "whpx"), ("hvf", "interp"), ("interp", "whpx")]  # fmt: skip


@contextlib.contextmanager
def backends(*names):
    undo = []
    for name in sorted(set(names) & {"hvf", "whpx"}):
        undo.append(install(name)[1])
    try:
        for name in names:
            probe = accel.probe(name)
            if not probe.usable:
                pytest.skip(f"{name} not usable here: {probe.reason}")
        yield
    finally:
        for fn in undo:
            fn()


def counter_vm(backend, vcpus=2, track_dirty_pages=False):
    return VM.from_dict({"machine": {"vcpus": vcpus, "memory_mib": 64, "accel": backend, "cpu": "portable",
                                     "track_dirty_pages": track_dirty_pages},
                         "boot": {"kernel": str(GUESTS / "counter.elf"), "cmdline": "console=ttyS0"}})  # fmt: skip


def count(vm) -> int:
    return vm.machine.memory.read_int(COUNTER, 4)


def progress(vm, beyond: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while (value := count(vm)) <= beyond:
        assert time.monotonic() < deadline, f"the counter stayed at {value}"
        time.sleep(0.01)
    return value


def run_then_pause(vm) -> None:
    """Start the counter guest, let it count past 1000, pause it."""
    vm.start()
    vm.console.wait_for("counter: start", timeout=60)
    progress(vm, 1000)
    vm.pause()


def paused_snapshot(tmp_path, backend):
    vm = counter_vm(backend)
    try:
        run_then_pause(vm)
        held = count(vm)
        figures = vm.snapshot(tmp_path / "vm.snap", tmp_path / "vm.mem")
        assert figures["memory_bytes"] == 64 << 20
    finally:
        vm.close()
    return held


@pytest.mark.parametrize("source, target", PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def test_a_snapshot_goes_on_where_it_was_paused(tmp_path, source, target):
    with backends(source, target):
        held = paused_snapshot(tmp_path, source)
        vm = VM.restore(tmp_path / "vm.snap", tmp_path / "vm.mem", accel=target)
        try:
            assert vm.state is VmState.PAUSED and vm.accel == target
            assert count(vm) == held, "guest RAM comes back as it was"
            vm.resume()
            progress(vm, held)
            vm.machine.memory.write_int(STOP, 1, 0x33)
            status = vm.wait(60)
            assert status is not None and status.code == 0x33, status
        finally:
            vm.close()


def test_the_memory_file_is_not_changed_by_the_restored_guest(tmp_path):
    held = paused_snapshot(tmp_path, "interp")
    before = (tmp_path / "vm.mem").read_bytes()[COUNTER : COUNTER + 4]
    vm = VM.restore(tmp_path / "vm.snap", tmp_path / "vm.mem", accel="interp", resume=True)
    try:
        progress(vm, held)
    finally:
        vm.close()
    assert (tmp_path / "vm.mem").read_bytes()[COUNTER : COUNTER + 4] == before == struct.pack("<I", held)


def test_a_snapshot_is_taken_only_while_paused(tmp_path):
    vm = counter_vm("interp")
    try:
        vm.start()
        with pytest.raises(TransitionError, match="cannot snapshot the VM: it is Running"):
            vm.snapshot(tmp_path / "s", tmp_path / "m")
    finally:
        vm.close()


@pytest.mark.parametrize("damage, words", [
    (lambda data: b"NOTASNAP" + data[8:], "not a pyvmm snapshot"),
    (lambda data: data[: len(data) // 2], "truncated"),
    (lambda data: data[:-3] + bytes(b ^ 0xFF for b in data[-3:]), "corrupt (CRC mismatch)"),
    (lambda data: data[:8] + struct.pack("<I", 99) + data[12:], "snapshot format version 99"),
    (lambda data: b"", "not a pyvmm snapshot (only 0 bytes)"),
])  # fmt: skip
def test_a_damaged_state_file_is_refused_in_one_line(tmp_path, damage, words):
    paused_snapshot(tmp_path, "interp")
    path = tmp_path / "vm.snap"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SnapshotError) as info:
        VM.restore(path, tmp_path / "vm.mem", accel="interp")
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_short_memory_file_is_refused(tmp_path):
    paused_snapshot(tmp_path, "interp")
    mem = tmp_path / "vm.mem"
    with open(mem, "r+b") as f:
        f.truncate(1 << 20)
    with pytest.raises(Exception, match="too short for the region"):
        VM.restore(tmp_path / "vm.snap", mem, accel="interp")


def test_the_state_file_format_is_as_documented(tmp_path):
    paused_snapshot(tmp_path, "interp")
    data = (tmp_path / "vm.snap").read_bytes()
    magic, version, _crc, length = HEADER.unpack_from(data)
    assert (magic, version, len(data)) == (b"PYVMMSNP", 1, HEADER.size + length)
    body = json.loads(data[HEADER.size :])
    assert body["backend"] == "interp" and len(body["vcpus"]) == 2
    assert body["memory"]["regions"] == [[0, 64 << 20, 0]]
    assert body["platform"]["kind"] == "userspace"
    assert set(body["devices"]) == {"serial", "i8042", "cmos", "post"}


@pytest.mark.parametrize("target", ["interp", "kvm"])
def test_snapshot_over_the_api_and_load_into_a_fresh_process(tmp_path, target):
    """Firecracker's sequence: PATCH /vm Paused, PUT /snapshot/create, the process is killed, a fresh
    pyvmm-firecracker gets PUT /snapshot/load with resume_vm; SendCtrlAltDel then stops the counter
    guest (status 0x2A) and the process exits with it."""
    if target == "kvm" and not accel.probe("kvm").usable:
        pytest.skip(f"kvm not usable here: {accel.probe('kvm').reason}")
    snap, mem = tmp_path / "fc.snap", tmp_path / "fc.mem"
    first, sock = spawn(tmp_path, accel="interp", cpu="portable")
    conn = UnixConnection(str(sock))
    try:
        assert request(conn, "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64})[0] == 204
        assert request(conn, "PUT", "/boot-source", {"kernel_image_path": str(GUESTS / "counter.elf"),
                                                     "boot_args": "console=ttyS0"})[0] == 204  # fmt: skip
        assert request(conn, "PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
        read_until(first.stdout, "counter: start")
        status, body = request(conn, "PUT", "/snapshot/create", {"snapshot_path": str(snap), "mem_file_path": str(mem)})
        assert status == 400 and "must be paused first" in body["fault_message"]
        assert request(conn, "PATCH", "/vm", {"state": "Paused"})[0] == 204
        assert request(conn, "PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": str(snap),
                                                         "mem_file_path": str(mem)})[0] == 204  # fmt: skip
    finally:
        conn.close()
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    sock.unlink(missing_ok=True)
    second, sock = spawn(tmp_path, accel=target)
    conn = UnixConnection(str(sock))
    try:
        status, body = request(conn, "PUT", "/snapshot/load", {"snapshot_path": str(snap), "mem_backend": {
            "backend_type": "File", "backend_path": str(mem)}, "resume_vm": True})  # fmt: skip
        assert status == 204, body
        assert request(conn, "GET", "/")[1]["state"] == "Running"
        if target == "interp":
            read_until(second.stdout, ".", timeout=30)  # the counter goes on (a dot per 2^20 counts)
        assert request(conn, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})[0] == 204
    finally:
        conn.close()
    out, err = finish(second)
    assert second.returncode == 0x2A, err.decode()[-2000:]
    assert b"counter: stop" in out


@pytest.mark.parametrize(("backend", "track"), [("interp", False), ("kvm", False), ("kvm", True)],
                         ids=["interp-compared", "kvm-compared", "kvm-dirty-log"])
def test_a_diff_snapshot_holds_only_what_changed_and_restores_on_its_base(tmp_path, backend, track):
    """Full, run on, Diff: the Diff's memory file holds only the pages that changed (the counter's,
    the stack's, a page the host wrote), and it restores on top of the Full one. With
    ``track_dirty_pages`` on KVM the pages come from KVM's dirty log plus the VMM's own writes."""
    import os

    from pyvmm.vmm.controller import ControllerError

    with backends(backend):
        vm = counter_vm(backend, track_dirty_pages=track)
        try:
            run_then_pause(vm)
            with pytest.raises(ControllerError, match="take a Full one first"):
                vm.snapshot(tmp_path / "none.snap", tmp_path / "none.mem", diff=True)
            full = vm.snapshot(tmp_path / "full.snap", tmp_path / "full.mem")
            held = count(vm)
            vm.resume()
            progress(vm, held)
            vm.pause()
            vm.machine.memory.write(0x300000, b"written between the snapshots")
            held2 = count(vm)
            diff = vm.snapshot(tmp_path / "diff.snap", tmp_path / "diff.mem", diff=True)
        finally:
            vm.close()
        assert diff["found_by"] == ("dirty log" if track else "comparison")
        assert diff["memory_bytes"] <= 16 * 4096 < full["memory_bytes"]
        assert os.stat(tmp_path / "diff.mem").st_blocks * 512 < os.stat(tmp_path / "full.mem").st_blocks * 512
        vm = VM.restore(tmp_path / "diff.snap", tmp_path / "diff.mem", accel=backend)
        try:
            assert count(vm) == held2 and vm.machine.memory.read(0x300000, 29) == b"written between the snapshots"
            vm.resume()
            progress(vm, held2)
            vm.machine.memory.write_int(STOP, 1, 0x44)
            assert vm.wait(60).code == 0x44
        finally:
            vm.close()
        (tmp_path / "full.mem").unlink()
        with pytest.raises(Exception, match="full.mem"):
            VM.restore(tmp_path / "diff.snap", tmp_path / "diff.mem", accel=backend)


def test_a_vm_restored_with_track_dirty_pages_takes_diffs_from_the_dirty_log(tmp_path):
    """Firecracker's load option: the restored VM logs its pages, and its Diff builds on the loaded chain."""
    with backends("kvm"):
        vm = counter_vm("kvm")
        try:
            run_then_pause(vm)
            vm.snapshot(tmp_path / "full.snap", tmp_path / "full.mem")
        finally:
            vm.close()
        vm = VM.restore(tmp_path / "full.snap", tmp_path / "full.mem", accel="kvm", resume=True, track_dirty_pages=True)
        try:
            assert vm.machine.dirty_log
            progress(vm, count(vm))
            vm.pause()
            held = count(vm)
            diff = vm.snapshot(tmp_path / "diff.snap", tmp_path / "diff.mem", diff=True)
        finally:
            vm.close()
        assert diff["found_by"] == "dirty log" and 0 < diff["memory_bytes"] <= 16 * 4096
        vm = VM.restore(tmp_path / "diff.snap", tmp_path / "diff.mem", accel="kvm")
        try:
            assert count(vm) == held and vm.machine.dirty_log  # kept from the snapshotted VM when not given
            vm.resume()
            progress(vm, held)
        finally:
            vm.close()
