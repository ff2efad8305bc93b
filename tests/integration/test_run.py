"""``pyvmm run -- CMD`` and ``vm.exec``: Debian's kernel on the host's own root, commands through the agent.

Two boots on the interpreter (KVM here is PVM and cannot boot Linux): one ``pyvmm run``
process (stdin, stdout, stderr, exit status, working directory, user), and one command VM
from Python that runs several commands in turn, kills a hung one at its timeout and
goes on, keeps the root read-only with writable tmpfs, and writes to an extra share.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ASSETS

pytestmark = pytest.mark.slow

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


@pytest.fixture(autouse=True)
def _needs():
    for name in ("vmlinux", "busybox", "modules"):
        if not (ASSETS / name).exists():
            pytest.skip(f"{ASSETS / name} missing: run scripts/fetch-test-kernel")
    if not os.path.exists(VIRTIOFSD):
        pytest.skip(f"{VIRTIOFSD} missing (Debian package qemu-system-common)")
    if os.geteuid() != 0:
        pytest.skip("virtiofsd needs root here")
    if not hasattr(__import__("socket"), "AF_VSOCK"):
        pytest.skip("this Python has no AF_VSOCK")


def test_pyvmm_run_forwards_input_output_status_directory_and_user(tmp_path):
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", "-v", "--accel", "interp", "--", "sh", "-c",
         'echo $((6*7)); ls /etc/hostname; echo "out $(pwd) $(id -u) $(uname -r)"; echo to-stderr >&2; '
         "tr a-z A-Z; exit 3"],
        input=b"hello from the host\n", capture_output=True, cwd=workdir, timeout=400,
        env={**os.environ, "PYVMM_KERNEL_DIR": str(ASSETS)},
    )  # fmt: skip
    seconds = time.monotonic() - started
    release = (ASSETS / "kernel-version").read_text().strip()
    assert proc.returncode == 3, proc.stderr.decode()[-3000:]
    assert proc.stdout.decode().splitlines() == ["42", "/etc/hostname", f"out {workdir} {os.getuid()} {release}",
                                                 "HELLO FROM THE HOST"]  # fmt: skip
    assert b"to-stderr\n" in proc.stderr
    assert b"start-up to the command" in proc.stderr  # -v reports it
    print(f"pyvmm run, whole process: {seconds:.1f} s")


def test_a_command_vm_runs_commands_in_turn_survives_a_hung_one_and_keeps_the_root_read_only(tmp_path):
    from pyvmm.run import guest

    share = tmp_path / "share"
    share.mkdir()
    os.environ["PYVMM_KERNEL_DIR"] = str(ASSETS)
    try:
        command_vm = guest.start(guest.RunOptions(accel="interp", shares=[share]))
    finally:
        os.environ.pop("PYVMM_KERNEL_DIR")
    with command_vm:
        vm = command_vm.vm
        status, out, err = vm.exec(["uname", "-r"])
        assert (status, out.decode().strip()) == (0, (ASSETS / "kernel-version").read_text().strip()), err
        python = vm.exec(["python3", "-c", "import sys; print(sys.version)"], env=dict(os.environ))
        assert python.status == 0 and python.stdout.decode().strip() == sys.version  # the host's own Python
        assert vm.exec(["cat", "/etc/hostname"]).stdout == open("/etc/hostname", "rb").read()
        assert vm.exec(["sh", "-c", "seq 1000 | wc -l"]).stdout.strip() == b"1000"
        result = vm.exec(["sh", "-c", "echo before; sleep 600"], timeout=3)
        assert result.timed_out and result.stdout == b"before\n"
        assert vm.exec(["sh", "-c", "cat; echo $((6 * 7))"], input=b"again\n").stdout == b"again\n42\n"
        denied = vm.exec(["sh", "-c", "touch /usr/pyvmm-must-not-exist"])
        assert denied.status != 0 and b"Read-only file system" in denied.stderr
        assert not os.path.exists("/usr/pyvmm-must-not-exist")
        assert vm.exec(["sh", "-c", "echo scratch > /tmp/x && cat /tmp/x"]).stdout == b"scratch\n"
        assert vm.exec(["sh", "-c", f"echo shared > {share}/from-guest"]).status == 0
        assert (share / "from-guest").read_text() == "shared\n"
        assert vm.exec(["false"]).status == 1
        assert vm.exec(["sh", "-c", "exit 7"]).status == 7
        assert any("virtiofsd" in " ".join(p.cmdline()) for p in psutil.Process().children(recursive=True))
    assert not command_vm.workdir.exists()
    assert not [p for p in psutil.Process().children(recursive=True) if "virtiofsd" in " ".join(p.cmdline())]
