"""Stock Linux (Debian's 6.1 cloud kernel + a busybox initramfs) on the bundled interpreter.

Through `pyvmm boot` with accel = "interp": the kernel boots to its init, the
init runs a command whose output is checked, and `reboot -f` (reboot=k, the
i8042 reset) ends the VM with status 0. Both boot paths (PVH entry of the
ELF vmlinux, 64-bit entry of the bzImage), 1 and 2 vCPUs, and ten boots in a
row for reliability (QEMU's TCG hangs in about half its boots here).
Assets: scripts/fetch-test-kernel.
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import ASSETS, pyvmm_boot
from pyvmm import accel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def need_interp_and_assets():
    probe = accel.probe("interp")
    if not probe.usable:
        pytest.skip(f"interpreter not usable here: {probe.reason}")
    for name in ("vmlinux", "bzImage", "initramfs.cpio.gz"):
        if not (ASSETS / name).exists():
            pytest.skip(f"{ASSETS / name} missing: run scripts/fetch-test-kernel")


def boot_linux(tmp_path, kernel: str, vcpus: int, cmd: str = "hello", timeout: float = 240):
    config = tmp_path / "linux.toml"
    config.write_text(
        f'[machine]\nvcpus = {vcpus}\nmemory_mib = 256\naccel = "interp"\n'
        f'[boot]\nkernel = "{ASSETS / kernel}"\ninitrd = "{ASSETS / "initramfs.cpio.gz"}"\n'
        f'cmdline = "console=ttyS0 reboot=k panic=-1 pyvmm.cmd={cmd}"\n'
    )
    # pyvmm's own timeout ends a hung boot first: status 124, the console tail and, at -v, where each
    # vCPU stood land in the assertion message instead of being lost with a killed child
    return pyvmm_boot(config, "-v", "--timeout", str(timeout - 30), timeout=timeout)


def assert_booted_to_init(result, vcpus: int):
    out = result.stdout
    assert result.returncode == 0, f"status {result.returncode}\n{result.stderr[-2000:]}\n{out[-3000:]}"
    version = (ASSETS / "kernel-version").read_text().strip()
    assert f"Linux version {version}" in out
    assert f"smp: Brought up 1 node, {vcpus} CPU" in out
    # pyvmm's ACPI tables (vmm/boot/acpi.py) describe the machine: Debian's kernel has no MP-table parser
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in out
    assert "ACPI: FACP 0x" in out and "ACPI: DSDT 0x" in out
    assert "pnp: PnP ACPI: found 3 devices" in out  # COM1, the i8042 and the RTC from the DSDT
    # the command run by init, and its output
    assert f"\n{version}\n" in out.replace("\r", "")  # `uname -r` from pyvmm.cmd=hello
    assert "pyvmm-init: hello ok" in out
    assert "pyvmm-init: done" in out
    assert "reboot: Restarting system" in out
    assert "Unable to calibrate against PIT" not in out  # the TSC frequency comes from CPUID
    assert "Marking TSC unstable" not in out  # the vCPUs' TSCs agree (no warp in Linux's sync check)
    assert "guest reset" in result.stderr or "reset (status 0)" in result.stderr


@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("kernel", ["vmlinux", "bzImage"])
def test_boot_to_init_and_reboot(tmp_path, kernel, vcpus):
    assert_booted_to_init(boot_linux(tmp_path, kernel, vcpus), vcpus)


def test_ten_boots_in_a_row(tmp_path):
    failures = []
    for attempt in range(10):
        vcpus = 1 + attempt % 2
        try:
            assert_booted_to_init(boot_linux(tmp_path, "vmlinux", vcpus), vcpus)
        except subprocess.TimeoutExpired as err:
            tail = (err.stdout or b"")[-500:]
            failures.append(f"boot {attempt + 1} ({vcpus} vCPUs): no end within {err.timeout} s; console tail {tail!r}")
        except AssertionError as err:
            failures.append(f"boot {attempt + 1} ({vcpus} vCPUs): {str(err)[:500]}")
    assert not failures, "\n".join(failures)


def test_repeated_hash_of_the_same_data_is_stable():
    """The same computation over the same bytes, eight times in the guest: one answer.

    Regression test for skipped syscall hooks: a stop from the kicker thread
    landing in the block of a `syscall` made unicorn skip pyvmm's hook, the
    syscall did nothing and returned its own number, and `head`/`dd` from
    /dev/zero produced a few bytes too few in most runs (see
    accel/interp/context.BlockExit and tests/unit/test_interp_stops.py).
    """
    import re

    from pyvmm.api import VM

    vm = VM.from_dict(
        {
            "machine": {"memory_mib": 256, "accel": "interp"},
            "boot": {
                "kernel": str(ASSETS / "vmlinux"),
                "initrd": str(ASSETS / "initramfs.cpio.gz"),
                "cmdline": "console=ttyS0 reboot=k panic=-1 pyvmm.cmd=shell",
            },
        }
    )
    with vm:
        vm.start()
        vm.console.wait_for("pyvmm-init: start", timeout=240)
        start = len(vm.console.output)
        vm.console.write("for i in 1 2 3 4 5 6 7 8; do head -c 4000000 /dev/zero | sha256sum; done; echo END-$((6*7))\n")
        vm.console.wait_for("END-42", timeout=600, start=start)
        sums = re.findall(r"\b([0-9a-f]{64})\b", vm.console.text[start:])
        vm.stop()
    expected = __import__("hashlib").sha256(bytes(4000000)).hexdigest()
    assert len(sums) == 8
    assert set(sums) == {expected}, f"{len(set(sums))} different sums"
