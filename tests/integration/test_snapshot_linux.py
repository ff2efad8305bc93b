"""Debian's kernel snapshotted through Firecracker's API and restored in a fresh process (the interpreter).

The initramfs's snapshot script (scripts/fetch-test-kernel) writes a file in tmpfs
(and one on a virtio-blk ext4 disk when there is one), then counts once a second
and reads commands from the console: ``check`` prints what it wrote, ``write``
writes again to the disk, ``stop`` ends it, and init then runs ``reboot -f``. The
first process is killed after the snapshot; the second loads it with
``resume_vm``: the count goes on from where it was, the files are intact, the
console takes commands, and the guest's reboot ends the process with status 0.
"""

from __future__ import annotations

import re
import signal
import subprocess

import pytest

from conftest import ASSETS
from test_firecracker_process import UnixConnection, finish, read_until, request, spawn
from test_virtio_linux import debugfs_cat, make_ext4

pytestmark = pytest.mark.slow


def _assets():
    for name in ("vmlinux", "initramfs.cpio.gz"):
        if not (ASSETS / name).exists():
            pytest.skip(f"{ASSETS / name} missing: run scripts/fetch-test-kernel")


@pytest.mark.parametrize("with_disk", [False, True], ids=["tmpfs", "virtio-blk"])
def test_linux_survives_a_snapshot_into_a_new_process(tmp_path, with_disk):
    _assets()
    image = make_ext4(tmp_path)[0] if with_disk else None
    snap, mem = tmp_path / "linux.snap", tmp_path / "linux.mem"
    first, sock = spawn(tmp_path, name="first.sock")
    conn = UnixConnection(str(sock))
    try:
        assert request(conn, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 256})[0] == 204
        assert request(conn, "PUT", "/boot-source", {
            "kernel_image_path": str(ASSETS / "vmlinux"), "initrd_path": str(ASSETS / "initramfs.cpio.gz"),
            "boot_args": "console=ttyS0 reboot=k panic=-1 pyvmm.cmd=snapshot"})[0] == 204  # fmt: skip
        if image is not None:
            assert request(conn, "PUT", "/drives/disk", {"drive_id": "disk", "path_on_host": str(image),
                                                         "is_root_device": False})[0] == 204  # fmt: skip
        assert request(conn, "PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
        before = read_until(first.stdout, "pyvmm-snap: count 3", timeout=240).decode(errors="replace")
        assert request(conn, "PATCH", "/vm", {"state": "Paused"})[0] == 204
        assert request(conn, "PUT", "/snapshot/create", {"snapshot_path": str(snap), "mem_file_path": str(mem)})[0] == 204
    finally:
        conn.close()
        first.send_signal(signal.SIGKILL)
        rest, _ = first.communicate(timeout=30)
    before += rest.decode(errors="replace")
    counts = [int(n) for n in re.findall(r"pyvmm-snap: count (\d+)", before)]
    tmpfs_sum = re.search(r"pyvmm-snap: tmpfs ([0-9a-f]{64})", before).group(1)
    if image is not None:
        assert "pyvmm-snap: disk ready" in before

    second, sock = spawn(tmp_path, name="second.sock", stdin=subprocess.PIPE)
    conn = UnixConnection(str(sock))
    try:
        status, body = request(conn, "PUT", "/snapshot/load", {"snapshot_path": str(snap), "mem_file_path": str(mem),
                                                               "resume_vm": True})  # fmt: skip
        assert status == 204, body
        after = read_until(second.stdout, f"pyvmm-snap: count {counts[-1] + 1}", timeout=60).decode(errors="replace")
        assert "pyvmm-snap: count 1\n" not in after.replace("\r", ""), "the guest went on; it did not boot again"
        second.stdin.write(b"check\n")
        second.stdin.flush()
        after += read_until(second.stdout, f"pyvmm-snap: tmpfs {tmpfs_sum}", timeout=60).decode(errors="replace")
        if image is not None:
            assert "pyvmm-snap: disk before the snapshot" in after + read_until(
                second.stdout, "pyvmm-snap: disk before", timeout=30).decode(errors="replace")
            second.stdin.write(b"write\n")
            second.stdin.flush()
            read_until(second.stdout, "pyvmm-snap: disk written", timeout=60)
        second.stdin.write(b"stop\n")
        second.stdin.flush()
    finally:
        conn.close()
    out, err = finish(second)
    assert second.returncode == 0, err.decode()[-3000:]
    text = out.decode(errors="replace")
    assert "pyvmm-snap: stopped at" in text and "pyvmm-init: done" in text
    for bad in ("Kernel panic", "BUG:", "Oops"):
        assert bad not in after + text
    if image is not None:
        assert "pyvmm-snap: disk unmounted" in text
        assert debugfs_cat(image, "/before.txt") == b"before the snapshot\n"
        assert debugfs_cat(image, "/after.txt") == b"after the restore\n"
