"""Debian's kernel with pyvmm's virtio-balloon and a rate-limited virtio-blk drive, on the interpreter.

One boot, driven through the Python API (``pyvmm.VM``) and Firecracker's routes in-process. The guest's
script is appended to the test initramfs as a second cpio archive (the kernel takes several). It reads
a drive limited to 256 KiB/s and an unlimited one with ``dd`` and prints the times, fills 120 MiB of
tmpfs and frees it (so that guest RAM is resident on the host), then waits for console commands while
the test inflates the balloon (host RSS must fall), reads the guest's memory statistics, and deflates.
"""

from __future__ import annotations

import gzip
import importlib.machinery
import importlib.util
import re
import time

import pytest

from conftest import ASSETS, ROOT
from pyvmm import VM, accel
from pyvmm.server.routes import FirecrackerApi

pytestmark = pytest.mark.slow

LIMIT = 256 << 10  # bytes/s of the limited drive
DISK = 2 << 20  # each drive's size: the limited one takes ~7 s past its first full bucket

SCRIPT = r"""
say() { echo "pyvmm-brl: $*"; }
for m in virtio_mmio virtio_blk virtio_balloon; do modprobe "$m" || say "modprobe $m failed"; done
for i in $(seq 40); do [ -e /dev/vda ] && [ -e /dev/vdb ] && break; sleep 0.25; done
now() { read up _ < /proc/uptime; echo "$up"; }
for d in vda vdb; do
    t0=$(now); dd if=/dev/$d of=/dev/null bs=65536 2>/dev/null; t1=$(now)
    say "dd $d $(cat /sys/block/$d/size) sectors $t0 $t1"
done
mkdir -p /mnt/fill && mount -t tmpfs -o size=200m tmpfs /mnt/fill
dd if=/dev/zero of=/mnt/fill/x bs=1048576 count=120 2>/dev/null
rm /mnt/fill/x
say "filled $(grep MemFree /proc/meminfo)"
while true; do
    if read -t 1 line; then
        case "$line" in
            mem) say "mem $(grep MemTotal /proc/meminfo | tr -s ' ')" ;;
            stop) break ;;
        esac
    fi
done
say "stopped"
"""


def _cpio_tool():
    loader = importlib.machinery.SourceFileLoader("fetch_test_kernel", str(ROOT / "scripts" / "fetch-test-kernel"))
    spec = importlib.util.spec_from_loader("fetch_test_kernel", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module.Cpio


def initramfs_with_script(tmp_path, name: str, script: str):
    """The test initramfs followed by a cpio holding /etc/pyvmm/<name>.sh."""
    cpio = _cpio_tool()()
    cpio.file(f"etc/pyvmm/{name}.sh", script.encode(), 0o755)
    path = tmp_path / "initramfs.cpio.gz"
    path.write_bytes((ASSETS / "initramfs.cpio.gz").read_bytes() + gzip.compress(cpio.finish(), mtime=0))
    return path


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_balloon_and_a_rate_limited_drive(tmp_path):
    pytest.importorskip("psutil")
    for name in ("vmlinux", "initramfs.cpio.gz"):
        if not (ASSETS / name).exists():
            pytest.skip(f"{ASSETS / name} missing: run scripts/fetch-test-kernel")
    probe = accel.probe("interp")
    if not probe.usable:
        pytest.skip(f"the interpreter is not usable: {probe.reason}")
    limited, unlimited = tmp_path / "limited.img", tmp_path / "unlimited.img"
    limited.write_bytes(b"\x11" * DISK)
    unlimited.write_bytes(b"\x22" * DISK)
    config = {
        "machine": {"memory_mib": 256, "accel": "interp"},
        "boot": {"kernel": str(ASSETS / "vmlinux"), "initrd": str(initramfs_with_script(tmp_path, "brl", SCRIPT)),
                 "cmdline": "console=ttyS0 reboot=k panic=-1 pyvmm.cmd=brl"},
        "drive": [{"path": str(limited), "rate_limiter": {"bandwidth": {"size": LIMIT, "refill_time": 1000}}},
                  {"path": str(unlimited)}],
        "balloon": {"amount_mib": 0, "deflate_on_oom": True, "stats_polling_interval_s": 1},
    }  # fmt: skip
    with VM.from_dict(config, base_dir=tmp_path) as vm:
        vm.start()
        vm.console.wait_for(re.compile(rb"pyvmm-brl: filled[^\n]*\n"), timeout=600)
        out = vm.console.text
        times = {d: (int(sectors) * 512, float(t1) - float(t0))
                 for d, sectors, t0, t1 in re.findall(r"pyvmm-brl: dd (vd\w) (\d+) sectors ([\d.]+) ([\d.]+)", out)}
        assert set(times) == {"vda", "vdb"}, out[-3000:]
        size, seconds = times["vda"]
        rate = size / seconds
        # the bucket starts full (LIMIT bytes), then LIMIT bytes a second
        expected = (size - LIMIT) / LIMIT
        print(f"limited drive: {size} bytes in {seconds:.2f} s ({rate / 1024:.0f} KiB/s, expected ~{expected:.1f} s); "
              f"unlimited: {times['vdb'][0]} bytes in {times['vdb'][1]:.2f} s")  # fmt: skip
        assert size == DISK
        assert 0.8 * expected <= seconds <= 1.5 * expected + 1, f"limited read took {seconds:.2f} s, expected ~{expected:.1f}"
        assert times["vdb"][1] * 3 < seconds, f"the unlimited drive was not much faster: {times}"
        blk0 = vm.machine.device_metrics()["virtio-blk0"]
        assert blk0["throttled"] > 0 and vm.machine.device_metrics()["virtio-blk1"]["throttled"] == 0

        # the balloon, through Firecracker's API in this process
        api = FirecrackerApi.for_vm(vm)
        stats = _wait(lambda: vm.balloon_statistics().get("total_memory"), 30, "the guest's first statistics")
        assert 200 << 20 <= stats <= 256 << 20, f"total_memory {stats}"
        rss_before = _rss()
        assert api.handle("PATCH", "/balloon", b'{"amount_mib": 160}').status == 204
        _wait(lambda: vm.balloon_statistics()["actual_mib"] >= 160, 300, "the guest to inflate to 160 MiB")
        rss_after = _rss()
        response = api.handle("GET", "/balloon/statistics")
        assert response.status == 200 and response.body["target_mib"] == 160 and response.body["actual_mib"] == 160
        print(f"balloon 160 MiB: host RSS {rss_before >> 20} -> {rss_after >> 20} MiB; stats {response.body}")
        assert rss_before - rss_after > 80 << 20, f"RSS fell by {(rss_before - rss_after) >> 20} MiB only"
        free_after = _wait(lambda: (s := vm.balloon_statistics()).get("free_memory", 1 << 40) < (100 << 20) and s,
                           30, "statistics showing the balloon's pages as used")  # fmt: skip
        assert free_after["free_memory"] < 100 << 20
        vm.set_balloon(0)
        _wait(lambda: vm.balloon_statistics()["actual_mib"] == 0, 120, "the guest to deflate")
        vm.console.write("stop\n")
        vm.console.wait_for("pyvmm-brl: stopped", timeout=60)
        status = vm.wait(timeout=120)
        assert status is not None and status.code == 0, status
