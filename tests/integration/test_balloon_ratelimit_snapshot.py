"""The balloon's live target and the rate limiters' live settings survive a snapshot (the counter guest on
the interpreter: the devices are built and restored; no driver uses them)."""

from __future__ import annotations

import pytest

from conftest import GUESTS
from pyvmm import accel
from pyvmm.api import VM
from pyvmm.devices.ratelimit import BucketConfig, RateLimiterConfig
from pyvmm.devices.virtio.balloon import VirtioBalloon
from pyvmm.devices.virtio.blk import VirtioBlock
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.server.routes import FirecrackerApi


def test_balloon_target_and_limiters_survive_a_snapshot(tmp_path):
    probe = accel.probe("interp")
    if not probe.usable:
        pytest.skip(f"the interpreter is not usable: {probe.reason}")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    vm = VM.from_dict({
        "machine": {"memory_mib": 64, "accel": "interp"},
        "boot": {"kernel": str(GUESTS / "counter.elf"), "cmdline": "console=ttyS0"},
        "drive": [{"path": str(image), "rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}],
        "rng": {"rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 100}}},
        "balloon": {"amount_mib": 4, "deflate_on_oom": False, "stats_polling_interval_s": 3},
    })  # fmt: skip
    new_limit = RateLimiterConfig(bandwidth=BucketConfig(1 << 20, 500, 4096), ops=BucketConfig(50, 1000))
    try:
        vm.start()
        vm.console.wait_for("counter: start", timeout=60)
        vm.set_balloon(12)
        vm.set_drive_rate_limiter(0, new_limit.as_dict())  # Firecracker's shape is taken too
        vm.pause()
        vm.snapshot(tmp_path / "vm.snap", tmp_path / "vm.mem")
    finally:
        vm.close()
    restored = VM.restore(tmp_path / "vm.snap", tmp_path / "vm.mem", accel="interp")
    try:
        devices = {type(t.device): t.device for t in restored.machine.virtio}
        assert devices[VirtioBalloon].target_pages == 12 * 256 and devices[VirtioBalloon].stats_polling_interval_s == 3
        assert devices[VirtioBlock].throttle.limiter.config == new_limit
        assert devices[VirtioRng].throttle.limiter.config == RateLimiterConfig(bandwidth=BucketConfig(4096, 100))
        shown = FirecrackerApi.for_vm(restored).handle("GET", "/vm/config").body
        assert shown["balloon"] == {"amount_mib": 12, "deflate_on_oom": False, "stats_polling_interval_s": 3}
        assert shown["drives"][0]["rate_limiter"] == new_limit.as_dict()
    finally:
        restored.close()
