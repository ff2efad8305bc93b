"""Guest RAM in a memfd (what a VM with a vhost-user device gets) on KVM and on the interpreter.

A ``[[share]]`` makes the builder allocate guest RAM with ``GuestMemory.shared`` (MAP_SHARED
memfd) instead of anonymous memory; the backends map it the same way. pyvmm's test guests
(hello, the e820 walk that touches RAM, SMP bring-up) must run unchanged on it, and the
virtiofsd started for the share must be gone when the VM is.
"""

from __future__ import annotations

import os

import psutil
import pytest

from conftest import GUESTS, pyvmm_boot


@pytest.fixture(params=["kvm", "interp"])
def linux_backend(request):
    from pyvmm import accel

    probe = accel.probe(request.param)
    if not probe.usable:
        pytest.skip(f"{request.param} not usable here: {probe.reason}")
    if not os.path.exists("/usr/lib/qemu/virtiofsd"):
        pytest.skip("/usr/lib/qemu/virtiofsd missing (Debian package qemu-system-common)")
    if os.geteuid() != 0:
        pytest.skip("virtiofsd's sandbox needs root")
    return request.param


def _daemons() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name", "status"])
            if p.info["name"] == "virtiofsd" and p.info["status"] != psutil.STATUS_ZOMBIE}


@pytest.mark.parametrize("guest, vcpus, expected", [("hello.elf", 1, "hello ok\n"), ("e820.elf", 1, "e820 ok\n"),
                                                    ("smp.elf", 2, "smp ok\n")])  # fmt: skip
def test_guests_run_on_shared_memory(tmp_path, linux_backend, guest, vcpus, expected):
    (tmp_path / "share").mkdir()
    config = tmp_path / "vm.toml"
    config.write_text(
        f'[machine]\nvcpus = {vcpus}\nmemory_mib = 64\naccel = "{linux_backend}"\n'
        f'[boot]\nkernel = "{GUESTS / guest}"\ncmdline = "console=ttyS0"\n'
        f'[[share]]\npath = "{tmp_path / "share"}"\ntag = "t"\n'
    )
    before = _daemons()
    result = pyvmm_boot(config, "-v", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.endswith(expected)
    assert "virtio-fs0: " in result.stderr and "shared as 't'" in result.stderr
    assert not (_daemons() - before), "a virtiofsd outlived the VM"


def test_a_vm_with_a_share_refuses_a_snapshot(tmp_path, linux_backend):
    from pyvmm.api import VM
    from pyvmm.vmm.snapshot import SnapshotError

    (tmp_path / "share").mkdir()
    vm = VM.from_dict({"machine": {"memory_mib": 64, "accel": linux_backend},
                       "boot": {"kernel": str(GUESTS / "counter.elf"), "cmdline": "console=ttyS0"},
                       "share": [{"path": str(tmp_path / "share"), "tag": "t"}]})  # fmt: skip
    try:
        assert vm.machine.memory.is_shared
        vm.start()
        vm.console.wait_for("counter: start", timeout=60)
        vm.pause()
        with pytest.raises(SnapshotError) as info:
            vm.snapshot(tmp_path / "vm.snap", tmp_path / "vm.mem")
        assert str(info.value).startswith("virtio-fs0 is a vhost-user device")
        assert not (tmp_path / "vm.snap").exists() and not (tmp_path / "vm.mem").exists()
        vm.resume()  # the refusal left the VM as it was
    finally:
        vm.close()


def test_a_failed_build_stops_the_daemons(tmp_path, monkeypatch, linux_backend):
    from pyvmm.api import VM
    from pyvmm.errors import BootError
    from pyvmm.vmm import builder

    running = []

    def broken_kernel(*_args):
        running.append(_daemons() - before)
        raise BootError("a kernel that cannot be loaded")

    monkeypatch.setattr(builder, "_load_guest", broken_kernel)  # after the devices, before the vCPUs
    (tmp_path / "share").mkdir()
    before = _daemons()  # (read by broken_kernel)
    vm = VM.from_dict({"machine": {"memory_mib": 64, "accel": linux_backend},
                       "boot": {"kernel": str(GUESTS / "hello.elf")},
                       "share": [{"path": str(tmp_path / "share"), "tag": "a"},
                                 {"path": str(tmp_path / "share"), "tag": "b", "read_only": True}]})  # fmt: skip
    try:
        with pytest.raises(BootError):
            vm.start()  # the machine is built here
        assert len(running[0]) >= 2  # both daemons (each a parent and its sandboxed child) ran at the failure
        assert not (_daemons() - before)
    finally:
        vm.close()


def test_a_missing_virtiofsd_is_one_line(tmp_path, linux_backend):
    (tmp_path / "share").mkdir()
    config = tmp_path / "vm.toml"
    config.write_text(f'[machine]\naccel = "{linux_backend}"\n[boot]\nkernel = "{GUESTS / "hello.elf"}"\n'
                      f'[[share]]\npath = "{tmp_path / "share"}"\ntag = "t"\n')  # fmt: skip
    result = pyvmm_boot(config, timeout=60, env={**os.environ, "PYVMM_VIRTIOFSD": str(tmp_path / "missing")})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"virtiofsd not found at {tmp_path / 'missing'}: install Debian's qemu-system-common package (or set PYVMM_VIRTIOFSD)")
