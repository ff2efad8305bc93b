"""`pyvmm boot` end states: exit statuses and one-line messages for fatal guest errors."""

from __future__ import annotations

import re

import pytest

from conftest import GUESTS, pyvmm_boot
from elfgen import JMP_SELF, LOAD_ADDR, OUT_F4_AL, UD2, mov_al, pvh_elf
from pyvmm import accel

def boot(tmp_path, backend, code=None, *, kernel=None, args=(), extra="", env=None, timeout=60):
    if kernel is None:
        kernel = tmp_path / "guest.elf"
        kernel.write_bytes(pvh_elf(code))
    config = tmp_path / "vm.toml"
    config.write_text(f'[machine]\nmemory_mib = 32\naccel = "{backend}"\n{extra}[boot]\nkernel = "{kernel}"\n')
    return pyvmm_boot(config, *args, timeout=timeout, env=env)


def test_triple_fault_is_a_one_line_error(tmp_path, backend):
    # ud2 with no IDT: #UD cannot be delivered -> double fault -> triple fault
    result = boot(tmp_path, backend, UD2)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(r"pyvmm: error: guest error \(vcpu 0, rip 0x[0-9a-f]+\): triple fault \(the vCPU shut down\)", lines[0])


def test_timeout_stops_a_spinning_guest(tmp_path, backend):
    result = boot(tmp_path, backend, JMP_SELF, args=["--timeout", "1"])
    assert result.returncode == 124
    assert "timed out" not in result.stdout


def test_timeout_reports_where_each_vcpu_was_at_v(tmp_path, backend):
    result = boot(tmp_path, backend, JMP_SELF, args=["--timeout", "1", "-v"])
    assert result.returncode == 124
    # the guest spins on its first instruction, at the PVH entry (32-bit protected mode, CPL 0)
    assert re.search(rf"vcpu0: rip {LOAD_ADDR:#x} cs 0x[0-9a-f]+ \(CPL 0, protected mode\)", result.stderr), result.stderr


def test_debug_exit_value_is_the_status(tmp_path, backend):
    result = boot(tmp_path, backend, mov_al(77) + OUT_F4_AL)
    assert result.returncode == 77
    assert result.stderr == ""


def test_quiet_and_verbose(tmp_path, backend):
    quiet = boot(tmp_path, backend, kernel=GUESTS / "hello.elf", args=["-q"])
    assert quiet.returncode == 0 and quiet.stderr == ""
    verbose = boot(tmp_path, backend, kernel=GUESTS / "hello.elf", args=["-v"])
    assert f"accelerator: {backend}" in verbose.stderr
    assert "VM ended after" in verbose.stderr


def test_log_level_from_the_environment(tmp_path, backend):
    import os

    env = dict(os.environ, PYVMM_LOG="info")
    result = boot(tmp_path, backend, kernel=GUESTS / "hello.elf", env=env)
    assert "VM ended after" in result.stderr


def test_kvm_emulation_failure_without_fallback_names_bytes_and_rip(tmp_path):
    from pyvmm.accel import kvm

    if not accel.probe("kvm").usable or not kvm.is_pvm_host():
        pytest.skip("needs a PVM KVM host, where KVM's emulator cannot run popcnt at CPL0")
    # popcnt eax, eax at CPL0: emulated by KVM on PVM, and its emulator does not know it
    result = boot(tmp_path, "kvm", b"\xf3\x0f\xb8\xc0" + mov_al(0) + OUT_F4_AL, extra="fallback = false\n")
    assert result.returncode == 1
    line = result.stderr.strip()
    assert re.fullmatch(
        r"pyvmm: error: guest error \(vcpu 0, rip 0x100000\): the hypervisor cannot emulate the instruction "
        r"\(bytes: f3 0f b8 c0 [0-9a-f ]+\) and the fallback is off",
        line,
    ), line


@pytest.mark.parametrize("signame, status", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_stop_signals_are_a_clean_stop_with_128_plus_the_signal(tmp_path, backend, signame, status):
    import signal
    import subprocess
    import sys
    import time

    from elfgen import pvh_elf as make_elf

    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(make_elf(JMP_SELF))
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    config = tmp_path / "vm.toml"
    config.write_text(f'[machine]\nmemory_mib = 32\naccel = "{backend}"\n[boot]\nkernel = "{kernel}"\n'
                      f'[[drive]]\npath = "{image}"\n')  # fmt: skip
    vm = subprocess.Popen([sys.executable, "-m", "pyvmm", "boot", str(config), "-v"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    time.sleep(2.0)
    assert vm.poll() is None, vm.communicate()[1]
    vm.send_signal(getattr(signal, signame))
    out, err = vm.communicate(timeout=30)
    assert vm.returncode == status, err
    assert f"terminated by {signame}" in err and "Traceback" not in err
    from pyvmm.devices.virtio.blk import VirtioBlock

    VirtioBlock.open(image).close()  # the image lock went with the VM
