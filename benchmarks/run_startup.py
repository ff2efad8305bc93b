#!/usr/bin/env python3
"""``pyvmm run -- true`` against QEMU booting the same kernel and initramfs, in the same run.

Per round:

* ``pyvmm run -- true``: the whole command, process start to exit, as a user waits for it;
* pyvmm to the agent: ``pyvmm boot`` of the command VM's own configuration (the kernel, the
  initramfs ``pyvmm run`` makes, the host root over virtio-fs, vsock), from spawn until the
  guest agent prints that it listens;
* QEMU to the agent: ``qemu-system-x86_64 -M microvm`` (TCG) with the same kernel, initramfs and
  virtio-fs root (``vhost-user-fs-device`` on a virtiofsd started the same way, guest RAM in a
  memfd), until the same line. QEMU has no vsock here (no /dev/vhost-vsock), so its agent cannot
  take commands; the line is where both VMMs have done the same work.

The ratio is pyvmm's time to the agent over QEMU's. Needs root (virtiofsd), tests/assets or
``pyvmm fetch-kernel``'s cache, and qemu-system-x86_64.

    sudo python3 benchmarks/run_startup.py [--rounds 3] [--accel interp]
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGENT_LINE = b"pyvmm-agent: listening"
TIMEOUT = 300.0


def until_line(command: list[str], *, env=None) -> float:
    """Seconds from spawning ``command`` until AGENT_LINE appears on its output; then it is ended."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    seen = b""
    try:
        while AGENT_LINE not in seen:
            ready, _, _ = select.select([child.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(child.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"{command[0]} ended before the agent came up: {seen[-1500:].decode(errors='replace')}")
                seen = seen[-4096:] + chunk
            if time.perf_counter() - started > TIMEOUT:
                raise RuntimeError(f"{command[0]}: no agent within {TIMEOUT:.0f} s: {seen[-1500:].decode(errors='replace')}")
        return time.perf_counter() - started
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def pyvmm_run_true(accel: str, env) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--accel", accel, "--", "true"], capture_output=True,
                          env=env, timeout=TIMEOUT)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"pyvmm run -- true failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-1500:]}")
    return time.perf_counter() - started


def pyvmm_to_agent(config: dict, work: Path, env) -> float:
    lines = []
    for section in ("machine", "boot", "vsock"):
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml(value)}" for key, value in config[section].items()]
    for share in config["share"]:
        lines.append("[[share]]")
        lines += [f"{key} = {_toml(value)}" for key, value in share.items()]
    path = work / "vm.toml"
    path.write_text("\n".join(lines) + "\n")
    (work / "vsock").unlink(missing_ok=True)
    return until_line([sys.executable, "-m", "pyvmm", "boot", str(path)], env=env)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def qemu_to_agent(config: dict, qemu: str) -> float:
    from pyvmm.host.virtiofsd import Virtiofsd

    memory = config["machine"]["memory_mib"]
    with Virtiofsd("/", read_only=True, name="qemu-root") as daemon:
        # As benchmarks/boot_interp.py runs QEMU, plus: modern virtio-mmio (virtiofsd refuses legacy
        # devices, microvm's default), guest RAM in a shared memfd, and the TSC frequency on the
        # command line (without it QEMU's TCG microvm stopped after "Marking TSC unstable" in every
        # try here; pyvmm tells the guest its TSC frequency through CPUID instead)
        command = [
            qemu, "-accel", "tcg", "-M", "microvm", "-global", "virtio-mmio.force-legacy=false", "-cpu", "max",
            "-m", f"{memory}M", "-smp", str(config["machine"]["vcpus"]), "-display", "none", "-serial", "stdio",
            "-monitor", "none", "-no-reboot", "-net", "none",
            "-object", f"memory-backend-memfd,id=mem,size={memory}M,share=on", "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=fs0,path={daemon.socket_path}",
            "-device", f"vhost-user-fs-device,chardev=fs0,tag={config['share'][0]['tag']}",
            "-kernel", config["boot"]["kernel"], "-initrd", config["boot"]["initrd"],
            "-append", f"{config['boot']['cmdline']} tsc_early_khz={host_tsc_khz()}",
        ]  # fmt: skip
        return until_line(command)


def host_tsc_khz() -> int:
    """The host's TSC frequency (TCG's RDTSC reads the host's TSC), from /proc/cpuinfo."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return 2_000_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--accel", default="interp", help="pyvmm's accelerator (QEMU runs TCG)")
    args = parser.parse_args()
    from pyvmm.run import guest

    qemu = shutil.which("qemu-system-x86_64")
    env = dict(os.environ)
    if not any((d / "vmlinux").is_file() for d in guest.asset_dirs()):
        print("no kernel: run scripts/fetch-test-kernel or pyvmm fetch-kernel first")
        return 2
    results: dict[str, list[float]] = {"pyvmm run -- true": [], "pyvmm to the agent": [], "QEMU to the agent": []}
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-run-") as tmp:
        work = Path(tmp)
        config = guest.prepare(guest.RunOptions(accel=args.accel), work)
        for _ in range(args.rounds):
            results["pyvmm run -- true"].append(pyvmm_run_true(args.accel, env))
            results["pyvmm to the agent"].append(pyvmm_to_agent(config, work, env))
            if qemu:
                results["QEMU to the agent"].append(qemu_to_agent(config, qemu))
    for name, values in results.items():
        if values:
            print(f"{name:22} median {statistics.median(values):6.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")
        else:
            print(f"{name:22} not measured (qemu-system-x86_64 missing)")
    if results["QEMU to the agent"]:
        ratio = statistics.median(results["pyvmm to the agent"]) / statistics.median(results["QEMU to the agent"])
        print(f"pyvmm / QEMU to the agent: {ratio:.2f}x (pyvmm on {args.accel}, QEMU on TCG, same kernel and initramfs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
