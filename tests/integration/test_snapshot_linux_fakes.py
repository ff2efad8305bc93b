"""Debian's kernel snapshotted on the interpreter and restored onto the Hypervisor.framework and WHPX
backends (against their fakes, tests/fakes), each in a fresh ``pyvmm-firecracker`` process, and back.

One boot: the interpreter (``--cpu portable``) runs the initramfs's snapshot script
(scripts/fetch-test-kernel: a file in tmpfs, then a count a second and console
commands) and is snapshotted after "count 3". That snapshot is loaded with
``resume_vm`` on HVF and on WHPX: the count goes on from where it was (the guest did not
boot again), ``check`` prints the tmpfs file's sha256 as before the snapshot, and each
fake-run guest is snapshotted in turn before ``stop`` ends it (init runs ``reboot -f``:
the process exits 0). The snapshot taken on the HVF fake then goes back onto the
interpreter, and the one taken on the WHPX fake onto the HVF fake, where the guest
goes on and stops the same way.

The child processes reach the fakes through tests/fakes/boot/sitecustomize.py
(``PYVMM_FAKE_PLATFORM``). Causes found making this pass: a 10 ms retranslation per
MMIO exit in the fakes' software CPU (tests/fakes/cpu.py), LAPIC timer ticks owed to a
guest that was itself behind (accel/irqchip/lapic.py ``timer_expire``), and the UART's
IRQ line object, new after a restore, disagreeing with the restored IOAPIC input
(vmm/snapshot.py ``restore_devices``: one lost edge stopped console input or output).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from conftest import ASSETS, FAKES_BOOT
from test_firecracker_process import UnixConnection, finish, read_until, request, spawn

pytestmark = pytest.mark.slow

#: what each fake prints when it refuses how the VMM completed an exit
REFUSALS = ("fake Hypervisor.framework:", "fake WHPX:", "fake WinHvEmulation:")


def _fake_env(monkeypatch, platform: str | None) -> None:
    """Route ``platform`` to its fake in the child processes spawned next (None: no fake)."""
    if platform is None:
        monkeypatch.delenv("PYVMM_FAKE_PLATFORM", raising=False)
        return
    monkeypatch.setenv("PYVMM_FAKE_PLATFORM", platform)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKES_BOOT), os.environ.get("PYTHONPATH")])))


def _counts(text: str) -> list[int]:
    """The counts printed in ``text`` (a number the line has ended after: the guest may be paused between
    its "\r" and "\n")."""
    return [int(n) for n in re.findall(r"pyvmm-snap: count (\d+)[\r\n]", text)]


def _drain(stream, seconds: float = 1.0) -> str:
    """What the (paused) guest printed and the test has not read yet."""
    seen, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen += stream.read(65536) or b""
        time.sleep(0.05)
    return seen.decode(errors="replace")


def _command(child, command: str, answer: str, tries: int = 4) -> str:
    """Type ``command`` until the guest prints ``answer``; everything read meanwhile. The script's
    ``read -t 1`` (busybox: a poll per character) drops a line whose characters it is reading as its
    second runs out; on the fakes, where each of those reads is slow, that happened to a typed line
    about once in five."""
    os.set_blocking(child.stdout.fileno(), False)
    seen = b""
    for _ in range(tries):
        child.stdin.write(f"{command}\n".encode())
        child.stdin.flush()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            seen += child.stdout.read(65536) or b""
            if answer.encode() in seen:
                return seen.decode(errors="replace")
            time.sleep(0.02)
    pytest.fail(f"the guest never answered {command!r}: {seen[-1500:]!r}")


def _boot_and_snapshot(tmp_path, snap, mem) -> tuple[str, str]:
    """Boot on the interpreter, snapshot after "count 3"; (its console output, the tmpfs sha256)."""
    first, sock = spawn(tmp_path, accel="interp", cpu="portable", name="boot.sock")
    conn = UnixConnection(str(sock))
    try:
        assert request(conn, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 256})[0] == 204
        assert request(conn, "PUT", "/boot-source", {
            "kernel_image_path": str(ASSETS / "vmlinux"), "initrd_path": str(ASSETS / "initramfs.cpio.gz"),
            "boot_args": "console=ttyS0 reboot=k panic=-1 pyvmm.cmd=snapshot"})[0] == 204  # fmt: skip
        assert request(conn, "PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
        before = read_until(first.stdout, "pyvmm-snap: count 3", timeout=240).decode(errors="replace")
        assert request(conn, "PATCH", "/vm", {"state": "Paused"})[0] == 204
        assert request(conn, "PUT", "/snapshot/create", {"snapshot_path": str(snap), "mem_file_path": str(mem)})[0] == 204
    finally:
        conn.close()
        first.send_signal(signal.SIGKILL)
        rest, _ = first.communicate(timeout=30)
    before += rest.decode(errors="replace")
    return before, re.search(r"pyvmm-snap: tmpfs ([0-9a-f]{64})", before).group(1)


def _restore_and_stop(tmp_path, accel: str, snap, mem, before: str, tmpfs_sum: str, *,
                      snapshot_to=None) -> str | None:
    """Load ``snap`` (whose guest printed ``before``) on ``accel`` in a fresh process and check the guest
    goes on from there; optionally snapshot it again (``snapshot_to``: (state, memory) paths) before
    ``stop``. Returns the console output up to that snapshot (None without one)."""
    last_count = _counts(before)[-1]
    child, sock = spawn(tmp_path, accel=accel, name=f"{accel}-{snap.stem}.sock", stdin=subprocess.PIPE)
    conn = UnixConnection(str(sock))
    try:
        try:
            status, body = request(conn, "PUT", "/snapshot/load", {"snapshot_path": str(snap), "mem_file_path": str(mem),
                                                                   "resume_vm": True})  # fmt: skip
        except TimeoutError:
            child.kill()
            pytest.fail(f"{accel}: no answer to /snapshot/load in 30 s; {finish(child)[1].decode(errors='replace')[-3000:]}")
        assert status == 204, body
        after = read_until(child.stdout, f"pyvmm-snap: count {last_count + 2}", timeout=120).decode(errors="replace")
        assert "pyvmm-snap: count 1\r" not in after and "Linux version" not in after, "the guest booted again"
        after += _command(child, "check", f"pyvmm-snap: tmpfs {tmpfs_sum}")
        after += read_until(child.stdout, "pyvmm-snap: count", timeout=60).decode(errors="replace")
        held = None
        if snapshot_to is not None:
            assert request(conn, "PATCH", "/vm", {"state": "Paused"})[0] == 204
            status, body = request(conn, "PUT", "/snapshot/create", {"snapshot_path": str(snapshot_to[0]),
                                                                     "mem_file_path": str(snapshot_to[1])})  # fmt: skip
            assert status == 204, body
            after += _drain(child.stdout)  # everything printed before the snapshot
            held = after
            assert request(conn, "PATCH", "/vm", {"state": "Resumed"})[0] == 204
        after += _command(child, "stop", "pyvmm-snap: stopped at")
    finally:
        conn.close()
    out, err = finish(child)
    text = after + out.decode(errors="replace")
    errors = err.decode(errors="replace")
    assert child.returncode == 0, f"{accel}: status {child.returncode}; {errors[-2000:]}; console: {text[-1500:]!r}"
    assert f"accelerator: {accel}" in errors
    assert "pyvmm-snap: stopped at" in text and "pyvmm-init: done" in text, text[-2000:]
    for bad in ("Kernel panic", "BUG:", "Oops", "WARNING:", "Marking TSC unstable"):
        assert bad not in text, f"{accel}: {bad!r} in the console: {text[-3000:]}"
    for refusal in REFUSALS:
        assert refusal not in errors, f"{accel}: the fake refused how the VMM completed an exit: {errors[-2000:]}"
    # the guest goes on where it was paused, even in the middle of a line
    counts = _counts(before[-400:] + after)
    assert counts == list(range(counts[0], counts[0] + len(counts))), f"{accel}: counts {counts}: {after[:800]!r}"
    assert counts[-1] > last_count + 1
    return held


def test_linux_snapshot_moves_between_the_interpreter_and_the_hvf_and_whpx_fakes(tmp_path, monkeypatch):
    for name in ("vmlinux", "initramfs.cpio.gz"):
        if not (ASSETS / name).exists():
            pytest.skip(f"{ASSETS / name} missing: run scripts/fetch-test-kernel")
    snap = {name: (tmp_path / f"{name}.snap", tmp_path / f"{name}.mem") for name in ("interp", "hvf", "whpx")}
    _fake_env(monkeypatch, None)
    printed, tmpfs_sum = _boot_and_snapshot(tmp_path, *snap["interp"])
    printed_on = {}
    for platform in ("hvf", "whpx"):
        _fake_env(monkeypatch, platform)
        printed_on[platform] = _restore_and_stop(tmp_path, platform, *snap["interp"], printed, tmpfs_sum,
                                                 snapshot_to=snap[platform])  # fmt: skip
    _fake_env(monkeypatch, None)
    _restore_and_stop(tmp_path, "interp", *snap["hvf"], printed_on["hvf"], tmpfs_sum)
    _fake_env(monkeypatch, "hvf")
    _restore_and_stop(tmp_path, "hvf", *snap["whpx"], printed_on["whpx"], tmpfs_sum)
