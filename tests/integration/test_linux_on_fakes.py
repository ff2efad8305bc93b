"""Debian's kernel on the Hypervisor.framework and WHPX backends against their fakes (tests/fakes), to init.

Through `pyvmm boot` with accel = "hvf" or "whpx" in a child process routed to the fake. The
kernel boots to its init and the command run by init prints its output; the VM is
then stopped with SIGTERM (a clean stop, status 143), because the init's closing
`sleep 1` never ends in this configuration (below).

`noapictimer` is on the command line: on the fakes every LAPIC access is an MMIO
exit executed in the interpreter's stepper (~1 ms here), and with the LAPIC timer's
accesses the boot takes more than ten minutes; with the PIT as the timer it
reaches init in about two. With `noapictimer`, the init's final `sleep 1` does not
return on the interpreter either (the kernel leaves no timer armed when idle):
a finding about that configuration, not about the backend, tracked in issue 10's note.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ASSETS, FAKES_BOOT

pytestmark = pytest.mark.slow

DONE = "pyvmm-init: done"
#: what each fake prints when it refuses how the VMM completed an exit
REFUSALS = {"hvf": ("fake Hypervisor.framework:",), "whpx": ("fake WHPX:", "fake WinHvEmulation:")}


@pytest.mark.parametrize("platform", ["hvf", "whpx"])
def test_debian_kernel_reaches_init_and_runs_a_command_on_the_fake(tmp_path, platform):
    for name in ("vmlinux", "initramfs.cpio.gz"):
        if not (ASSETS / name).exists():
            pytest.skip(f"{ASSETS / name} missing: run scripts/fetch-test-kernel")
    config = tmp_path / "linux.toml"
    config.write_text(
        f'[machine]\nvcpus = 1\nmemory_mib = 256\naccel = "{platform}"\n'
        f'[boot]\nkernel = "{ASSETS / "vmlinux"}"\ninitrd = "{ASSETS / "initramfs.cpio.gz"}"\n'
        'cmdline = "console=ttyS0 reboot=k panic=-1 pyvmm.cmd=hello noapictimer"\n'
    )
    env = {**os.environ, "PYVMM_FAKE_PLATFORM": platform,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(FAKES_BOOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    child = subprocess.Popen([sys.executable, "-m", "pyvmm", "boot", str(config), "-v", "--timeout", "600"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)  # fmt: skip
    lines, deadline = [], time.monotonic() + 600
    try:
        for raw in child.stdout:
            lines.append(raw.decode(errors="replace"))
            if DONE in lines[-1] or time.monotonic() > deadline:
                break
    finally:
        child.send_signal(signal.SIGTERM)
        rest, stderr = child.communicate(timeout=60)
    out = "".join(lines) + rest.decode(errors="replace")
    err = stderr.decode(errors="replace")
    version = (ASSETS / "kernel-version").read_text().strip()
    assert f"Linux version {version}" in out, err[-2000:]
    assert "Run /init as init process" in out
    assert f"\n{version}\n" in out.replace("\r", "")  # `uname -r` from pyvmm.cmd=hello
    assert "pyvmm-init: hello ok" in out and DONE in out, out[-3000:] + err[-2000:]
    for bad in ("Kernel panic", "BUG:", "Oops", "general protection"):
        assert bad not in out
    for refusal in REFUSALS[platform]:
        assert refusal not in err, "the fake refused how the VMM completed an exit"
    assert f"accelerator: {platform}" in err
    assert child.returncode == 128 + signal.SIGTERM, err[-2000:]
