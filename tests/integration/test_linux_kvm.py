"""Debian's stock kernel on KVM: its first console lines prove the boot protocols.

On this PVM host guest kernel code is emulated by KVM (~1 us/instruction), so
the kernel is only followed to its first console lines (the banner, the
command line and the e820 map it was given), through the PVH entry of the
ELF vmlinux and through the bzImage 64-bit entry (whose decompressor runs
emulated here: slow). Full Linux boots are verified in the interpreter.
Assets come from scripts/fetch-test-kernel (run by scripts/test).
"""

from __future__ import annotations

import re

import pytest

from conftest import ASSETS, kvm_skip_reason
from pyvmm.api import VM

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

CMDLINE = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 pyvmm.test=early"


def _assets(name):
    path = ASSETS / name
    if not path.exists():
        pytest.skip(f"{path} missing: run scripts/fetch-test-kernel")
    return path


@pytest.fixture(autouse=True)
def need_kvm():
    reason = kvm_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize(
    "image, timeout",
    [
        # measured here: ~21 s to the command line through PVH
        ("vmlinux", 240),
        # measured here: the emulated LZ4 decompressor takes minutes before the banner
        ("bzImage", 900),
    ],
)
def test_debian_kernel_first_console_lines(image, timeout):
    kernel = _assets(image)
    vm = VM.from_dict(
        {
            "machine": {"memory_mib": 256, "accel": "kvm"},
            "boot": {"kernel": str(kernel), "cmdline": CMDLINE},
        }
    )
    with vm:
        vm.start()
        banner = vm.console.wait_for_line("Linux version", timeout=timeout)
        vm.console.wait_for_line("Command line:", timeout=120)
        vm.console.wait_for_line("NX (Execute Disable) protection", timeout=120)  # the line after the e820 map
        text = vm.console.text
        vm.stop()
    assert "Debian" in banner and "6.1." in banner
    assert f"Command line: {CMDLINE}" in text
    # the e820 map the kernel reports is the one pyvmm wrote (see vmm/boot/e820.py)
    usable = re.findall(r"BIOS-e820: \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\] usable", text)
    assert ("0x0000000000000000", "0x000000000009fbff") in usable
    assert ("0x0000000000100000", f"{(256 << 20) - 1:#018x}") in usable
