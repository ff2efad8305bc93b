"""pyvmm where Linux's facilities are missing: the simulation of a macOS/Windows host (tests/simulate_non_linux.py).

fcntl, termios, pyroute2, epoll, eventfd, preadv/pwritev, memfd_create and the mmap
flags are gone and sys.platform says "darwin": ``pyvmm check``, ``pyvmm demo``, the test
guests and Debian's kernel with a virtio-blk drive must all work on the interpreter,
which is what macOS and Windows runners without a hypervisor use.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ASSETS, GUESTS
from pyvmm import accel

SIMULATOR = Path(__file__).resolve().parent.parent / "simulate_non_linux.py"


@pytest.fixture(autouse=True)
def interpreter():
    probe = accel.probe("interp")
    if not probe.usable:
        pytest.skip(f"interpreter not usable here: {probe.reason}")


def pyvmm(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SIMULATOR), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def test_check_names_each_platforms_accelerator_and_why_not():
    result = pyvmm("check")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if not line.startswith(" ")}
    assert "only available on Linux (this host is darwin)" in lines["kvm"]
    assert "only available on Windows" in lines["whpx"]
    assert "unusable" in lines["hvf"]
    assert "interp  usable" in lines["interp"]


def test_demo_runs_on_the_interpreter_and_says_why():
    result = pyvmm("demo", "-v")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello from pyvmm guest\nhello ok\n"
    assert "accelerator kvm skipped: only available on Linux" in result.stderr
    assert "accelerator: interp" in result.stderr


GUEST_RUNS = [
    ("hello.elf", "console=ttyS0", 1, 0, "hello ok"),
    ("cmdline.elf", "console=ttyS0 pyvmm=simulated", 1, 0, "pyvmm=simulated"),
    ("smp.elf", "console=ttyS0", 2, 0, "smp ok"),
    ("exceptions.elf", "console=ttyS0", 1, 0, "exceptions ok"),
    ("apictimer.elf", "console=ttyS0", 1, 0, "apictimer ok"),
    ("pio.elf", "console=ttyS0", 1, 0, "pio ok"),
    ("reset.elf", "console=ttyS0", 1, 0, ""),
]


@pytest.mark.parametrize("guest, cmdline, vcpus, status, marker", GUEST_RUNS, ids=[g[0] for g in GUEST_RUNS])
def test_the_test_guests_boot(tmp_path, guest, cmdline, vcpus, status, marker):
    config = tmp_path / "vm.toml"
    config.write_text(f'[machine]\nvcpus = {vcpus}\nmemory_mib = 64\n'
                      f'[boot]\nkernel = "{GUESTS / guest}"\ncmdline = "{cmdline}"\n')  # fmt: skip
    result = pyvmm("boot", str(config), "-v")
    assert result.returncode == status, result.stdout + result.stderr
    assert marker in result.stdout and "accelerator: interp" in result.stderr


@pytest.mark.slow
def test_debian_kernel_to_init_with_a_virtio_blk_drive(tmp_path):
    """Debian's kernel on the simulated host: the ext4 drive's manifest is checked in the guest,
    64 MiB are written there and verified on the host after exit, the read-only drive refuses writes."""
    from test_virtio_linux import debugfs_cat, make_ext4

    for name in ("vmlinux", "initramfs.cpio.gz"):
        if not (ASSETS / name).exists():
            pytest.skip(f"{ASSETS / name} missing: run scripts/fetch-test-kernel")
    image, nfiles = make_ext4(tmp_path)
    ro_image = tmp_path / "ro.img"
    ro_image.write_bytes(b"\xab" * (1 << 20))
    config = tmp_path / "vm.toml"
    config.write_text(
        f'[machine]\nmemory_mib = 256\n'
        f'[boot]\nkernel = "{ASSETS / "vmlinux"}"\ninitrd = "{ASSETS / "initramfs.cpio.gz"}"\n'
        'cmdline = "console=ttyS0 reboot=k panic=-1 pyvmm.cmd=virtio"\n'
        f'[[drive]]\npath = "{image}"\nserial = "data"\n'
        f'[[drive]]\npath = "{ro_image}"\nread_only = true\nserial = "ro"\n[rng]\nenabled = true\n'
    )
    result = pyvmm("boot", str(config), "-v", timeout=900)
    out = result.stdout
    assert result.returncode == 0, f"{result.stderr[-2000:]}\n{out[-3000:]}"
    assert "accelerator: interp" in result.stderr
    assert "pyvmm-init: done" in out
    assert f"pyvmm-virtio: manifest ok {nfiles} files" in out, out[-3000:]
    assert debugfs_cat(image, "/result.txt") == b"written by the guest\n"
    guest_sum = out.split("pyvmm-virtio: big ")[1].split()[0]
    assert hashlib.sha256(debugfs_cat(image, "/big.bin")).hexdigest() == guest_sum
    assert "pyvmm-virtio: ro write refused" in out and ro_image.read_bytes() == b"\xab" * (1 << 20)
