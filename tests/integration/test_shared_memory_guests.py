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
