"""The balloon and rate limiters in pyvmm's TOML config and in a snapshot's saved configuration."""

from __future__ import annotations

import pytest

from pyvmm.config import load_config
from pyvmm.devices.ratelimit import BucketConfig, RateLimiterConfig
from pyvmm.errors import ConfigError
from pyvmm.vmm.snapshot import config_from_data, config_to_data


def write(tmp_path, text):
    (tmp_path / "disk.img").write_bytes(bytes(4096))
    path = tmp_path / "vm.toml"
    path.write_text('[boot]\nkernel = "vmlinux"\n' + text)
    return path


FULL = """
[machine]
memory_mib = 256
[[drive]]
path = "disk.img"
rate_limiter = { bandwidth = { size = 1048576, refill_time = 1000 }, ops = { size = 100, one_time_burst = 50, refill_time = 500 } }
[[net]]
tap = "tap9"
tx_rate_limiter = { ops = { size = 1000, refill_time = 1000 } }
[rng]
rate_limiter = { bandwidth = { size = 4096, refill_time = 100 } }
[balloon]
amount_mib = 64
deflate_on_oom = true
stats_polling_interval_s = 2
"""


def test_balloon_and_limiters_from_toml(tmp_path, kernel_file):
    cfg = load_config(write(tmp_path, FULL))
    assert cfg.drives[0].rate_limiter == RateLimiterConfig(BucketConfig(1 << 20, 1000), BucketConfig(100, 500, 50))
    assert cfg.nets[0].tx_rate_limiter == RateLimiterConfig(ops=BucketConfig(1000, 1000))
    assert cfg.nets[0].rx_rate_limiter is None
    assert cfg.rng and cfg.rng_rate_limiter == RateLimiterConfig(bandwidth=BucketConfig(4096, 100))
    assert (cfg.balloon.amount_mib, cfg.balloon.deflate_on_oom, cfg.balloon.stats_polling_interval_s) == (64, True, 2)
    assert cfg.virtio_device_count == 4


def test_balloon_defaults(tmp_path, kernel_file):
    cfg = load_config(write(tmp_path, "[balloon]\n"))
    assert (cfg.balloon.amount_mib, cfg.balloon.deflate_on_oom, cfg.balloon.stats_polling_interval_s) == (0, False, 0)
    assert load_config(write(tmp_path, "")).balloon is None


@pytest.mark.parametrize("text, key, words", [
    ("[balloon]\namount_mib = 129\n", "balloon.amount_mib", "between 0 and the guest's 128 MiB"),
    ("[balloon]\namount_mib = -1\n", "balloon.amount_mib", "between 0"),
    ("[balloon]\namount_mib = true\n", "balloon.amount_mib", "must be an integer"),
    ("[balloon]\nstats_polling_interval_s = 70000\n", "balloon.stats_polling_interval_s", "0 (off) to 65535"),
    ("[balloon]\ninflate = 1\n", "balloon.inflate", "unknown key"),
    ('[[drive]]\npath = "disk.img"\nrate_limiter = 5\n', "drive[0].rate_limiter", "must be a table like"),
    ('[[drive]]\npath = "disk.img"\nrate_limiter = { ops = { size = 1 } }\n', "drive[0].rate_limiter.ops.refill_time",
     "missing"),
    ('[[drive]]\npath = "disk.img"\nrate_limiter = { ops = { size = -3, refill_time = 1 } }\n',
     "drive[0].rate_limiter.ops.size", "between 0 and"),
    ('[[net]]\ntap = "t0"\nrx_rate_limiter = { bytes = {} }\n', "net[0].rx_rate_limiter.bytes", "unknown field"),
    ("[rng]\nrate_limiter = { bandwidth = { size = 1.5, refill_time = 1 } }\n", "rng.rate_limiter.bandwidth.size",
     "must be an integer"),
])  # fmt: skip
def test_bad_values_name_the_key_on_one_line(tmp_path, kernel_file, text, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert f": {key}: " in message and words in message and "\n" not in message


def test_the_snapshot_keeps_balloon_and_limiters(tmp_path, kernel_file):
    cfg = load_config(write(tmp_path, FULL))
    cfg.balloon.amount_mib = 100  # a live change (PATCH /balloon) is what the snapshot keeps
    cfg.drives[0].rate_limiter = RateLimiterConfig(ops=BucketConfig(10, 1000))
    back = config_from_data(config_to_data(cfg), ["interp"], "test.snap")
    assert back.balloon == cfg.balloon and back.drives[0].rate_limiter == cfg.drives[0].rate_limiter
    assert back.nets[0].tx_rate_limiter == cfg.nets[0].tx_rate_limiter and back.nets[0].rx_rate_limiter is None
    assert back.rng_rate_limiter == cfg.rng_rate_limiter
