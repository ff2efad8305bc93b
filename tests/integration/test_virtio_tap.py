"""TAP handling of virtio-net through `pyvmm boot`: created when missing (root), removed on exit, clear errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from conftest import GUESTS
from elfgen import JMP_SELF, pvh_elf
from pyvmm import accel


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespace, TAP creation)")
    if not shutil.which("ip"):
        pytest.skip("needs iproute2's ip")
    name = f"pyvmm-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    yield name
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def backend():
    for name in ("kvm", "interp"):
        if accel.probe(name).usable:
            return name
    pytest.skip("no accelerator usable here")


def links(netns) -> str:
    return subprocess.run(["ip", "-n", netns, "link", "show"], capture_output=True, text=True, check=True).stdout


def start(tmp_path, netns, backend, kernel, tap, *args):
    config = tmp_path / "vm.toml"
    config.write_text(f'[machine]\nmemory_mib = 32\naccel = "{backend}"\n[boot]\nkernel = "{kernel}"\n[[net]]\ntap = "{tap}"\n')
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "pyvmm", "boot", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def test_missing_tap_is_created_and_removed_on_exit(tmp_path, netns, backend):
    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(pvh_elf(JMP_SELF))
    vm = start(tmp_path, netns, backend, kernel, "pyvmmtap0", "--timeout", "3")
    seen = False
    deadline = time.monotonic() + 30
    while vm.poll() is None and time.monotonic() < deadline:
        seen |= "pyvmmtap0" in links(netns)
        time.sleep(0.1)
    out, err = vm.communicate(timeout=30)
    assert vm.returncode == 124, err
    assert seen, "the TAP device never appeared while the VM ran"
    assert "pyvmmtap0" not in links(netns), "the TAP pyvmm created was left behind"


def test_existing_tap_is_used_and_kept(tmp_path, netns, backend):
    subprocess.run(["ip", "-n", netns, "tuntap", "add", "dev", "keep0", "mode", "tap", "vnet_hdr"], check=True)
    vm = start(tmp_path, netns, backend, GUESTS / "hello.elf", "keep0")
    out, err = vm.communicate(timeout=60)
    assert vm.returncode == 0, err
    assert "Hello from pyvmm guest" in out
    assert "keep0" in links(netns)


def test_a_device_that_is_not_a_tap_is_a_one_line_error(tmp_path, netns, backend):
    vm = start(tmp_path, netns, backend, GUESTS / "hello.elf", "lo")
    out, err = vm.communicate(timeout=60)
    assert vm.returncode != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm: error: tap 'lo'"), err
    assert "Traceback" not in err


@pytest.mark.parametrize("signame, status", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_stop_signals_end_the_vm_cleanly_and_remove_the_tap(tmp_path, netns, backend, signame, status):
    """What systemd, container runtimes and orchestrators send: a clean stop, status 128 + signal."""
    import signal

    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(pvh_elf(JMP_SELF))
    vm = start(tmp_path, netns, backend, kernel, "pyvmmsig0", "-v")
    deadline = time.monotonic() + 30
    while "pyvmmsig0" not in links(netns) and vm.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "pyvmmsig0" in links(netns), "the TAP device never appeared"
    time.sleep(1.0)  # into the run phase
    vm.send_signal(getattr(signal, signame))
    out, err = vm.communicate(timeout=30)
    assert vm.returncode == status, err
    assert "VM started" in err and "Traceback" not in err
    assert "pyvmmsig0" not in links(netns), f"{signame} left the TAP pyvmm created behind"
