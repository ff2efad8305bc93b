"""Token buckets and rate limiters (devices/ratelimit.py) on a fake clock, and the limiters in virtio-blk,
virtio-net and virtio-rng through the mock driver: a throttled queue is not consumed, one timer is armed,
and the queue resumes when it fires."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from pyvmm.devices.ratelimit import BucketConfig, RateLimiter, RateLimiterConfig, RateLimiterError, TokenBucket
from pyvmm.devices.virtio.mock_driver import ManualHost, mock_guest

MS = 1_000_000  # ns


class FakeClock:
    def __init__(self):
        self.ns = 0

    def __call__(self) -> int:
        return self.ns

    def advance_ms(self, ms: float) -> None:
        self.ns += round(ms * MS)


def limiter(clock, bandwidth=None, ops=None) -> RateLimiter:
    return RateLimiter(RateLimiterConfig(BucketConfig(*bandwidth) if bandwidth else None,
                                         BucketConfig(*ops) if ops else None), clock=clock)  # fmt: skip


# --- the token bucket ------------------------------------------------------------------------
def test_a_bucket_starts_full_and_refills_at_size_per_refill_time():
    clock = FakeClock()
    bucket = TokenBucket(1000, 100, clock=clock)  # 1000 tokens per 100 ms
    assert bucket.available() == 1000
    bucket.take(1000)
    assert not bucket.can_take(1)
    clock.advance_ms(0.09)  # 0.9 of a token
    assert bucket.available() == 0
    clock.advance_ms(0.01)  # the carried fraction makes a whole token exactly at 0.1 ms
    assert bucket.available() == 1
    clock.advance_ms(49.9)
    assert bucket.available() == 500
    clock.advance_ms(1000)  # never more than size
    assert bucket.available() == 1000


def test_refill_in_many_small_steps_loses_no_fraction():
    clock = FakeClock()
    bucket = TokenBucket(7, 1000, clock=clock)  # 7 tokens a second: 142.857... ms each
    bucket.take(7)
    for _ in range(1000):
        clock.ns += 1_000_003  # 1.000003 ms, so every step earns a fraction
        bucket.available()
    # 1000 steps = 1.000003 s -> 7.000021 tokens earned, capped at 7
    assert bucket.available() == 7
    bucket.take(7)
    clock.ns += 142_857_142
    assert bucket.available() == 0  # one ns short of the first token (1000 ms / 7 = 142857142.86 ns)
    clock.ns += 1
    assert bucket.available() == 1


def test_wait_is_exactly_the_time_to_the_missing_tokens():
    clock = FakeClock()
    bucket = TokenBucket(1000, 1000, clock=clock)  # 1 token per ms
    bucket.take(1000)
    assert bucket.wait_ns(250) == 250 * MS
    clock.advance_ms(100.5)
    assert bucket.wait_ns(250) == 149.5 * MS
    clock.ns += bucket.wait_ns(250) - 1
    assert not bucket.can_take(250)
    clock.ns += 1
    assert bucket.can_take(250) and bucket.wait_ns(250) == 0


def test_one_time_burst_is_spent_first_and_never_refills():
    clock = FakeClock()
    bucket = TokenBucket(100, 1000, 300, clock=clock)
    assert bucket.available() == 400
    bucket.take(250)  # from the burst alone
    assert (bucket.one_time_burst, bucket.budget) == (50, 100)
    bucket.take(120)  # the burst's last 50, then 70 of the budget
    assert (bucket.one_time_burst, bucket.budget) == (0, 30)
    clock.advance_ms(10_000)
    assert bucket.available() == 100  # the burst is gone for good


def test_a_request_larger_than_the_bucket_waits_for_a_full_bucket_then_leaves_a_debt():
    clock = FakeClock()
    bucket = TokenBucket(100, 100, clock=clock)  # 1 token per ms
    bucket.take(50)
    assert not bucket.can_take(300) and bucket.wait_ns(300) == 50 * MS  # until the bucket is full again
    clock.advance_ms(50)
    assert bucket.can_take(300)
    bucket.take(300)
    assert bucket.budget == -200
    assert bucket.wait_ns(1) == 201 * MS  # the debt is paid before anything else passes


def test_limiter_needs_both_buckets_and_charges_neither_on_refusal():
    clock = FakeClock()
    rl = limiter(clock, bandwidth=(4096, 1000), ops=(2, 1000))
    assert rl.try_consume(1500) and rl.try_consume(1500)
    assert not rl.try_consume(1000)  # the ops bucket is empty
    assert rl.bandwidth.available() == 1096  # and the refused request took no bytes
    assert rl.wait_ns(1000) == 500 * MS  # one op back after half a second
    clock.advance_ms(500)
    assert not rl.try_consume(3500)  # an op now, but not 3500 bytes (1096 + 2048)
    assert rl.ops.available() == 1  # the op was not taken either
    assert rl.wait_ns(3500) == round((3500 - 3144) * 1000 / 4096 * MS + 0.5)
    assert rl.try_consume(3000)


def test_limiter_without_buckets_or_with_zero_fields_limits_nothing():
    clock = FakeClock()
    for config in (RateLimiterConfig(), RateLimiterConfig(BucketConfig(0, 100), BucketConfig(10, 0))):
        rl = RateLimiter(config, clock=clock)
        assert not rl.limits
        assert all(rl.try_consume(1 << 30) for _ in range(100))
        assert rl.wait_ns(1 << 40) == 0


def test_config_from_firecracker_json_and_patch_semantics():
    config = RateLimiterConfig.from_dict({"bandwidth": {"size": 1 << 20, "refill_time": 1000},
                                          "ops": {"size": 100, "one_time_burst": 50, "refill_time": 100}})  # fmt: skip
    assert config.as_dict() == {"bandwidth": {"size": 1 << 20, "one_time_burst": 0, "refill_time": 1000},
                                "ops": {"size": 100, "one_time_burst": 50, "refill_time": 100}}  # fmt: skip
    patched = config.updated({"ops": {"size": 0, "refill_time": 0}})
    assert patched.bandwidth == config.bandwidth and not patched.ops.limits
    assert config.updated({}) == config


@pytest.mark.parametrize("data, key, words", [
    ([], "", "must be an object"),
    ({"bandwith": {}}, "bandwith", "unknown field"),
    ({"ops": {"size": 10}}, "ops.refill_time", "missing"),
    ({"ops": {"size": -1, "refill_time": 10}}, "ops.size", "between 0 and"),
    ({"ops": {"size": True, "refill_time": 10}}, "ops.size", "must be an integer"),
    ({"bandwidth": {"size": 1, "refill_time": 1.5}}, "bandwidth.refill_time", "must be an integer"),
    ({"bandwidth": {"size": 1, "refill_time": 1, "burst": 3}}, "bandwidth.burst", "unknown field"),
    ({"bandwidth": 5}, "bandwidth", "must be an object"),
])  # fmt: skip
def test_bad_limiter_configs_name_the_field(data, key, words):
    with pytest.raises(RateLimiterError) as info:
        RateLimiterConfig.from_dict(data)
    assert info.value.key == key and words in info.value.problem


# --- in the devices ----------------------------------------------------------------------------
def limited(device, host: ManualHost, *throttles):
    """``device`` on a ManualHost whose clock also drives its limiters; returns the set-up mock driver."""
    device.attach_host(host)
    for throttle in throttles:
        throttle.set_clock(lambda: round(host.now * 1e9))
    driver = mock_guest(device, 4 << 20)
    driver.setup()
    return driver


def blk_read(driver, queue, sector=0, length=4096, kick=True):
    header, data, status = driver.alloc(16), driver.alloc(length), driver.alloc(1)
    driver.memory.write(header, struct.pack("<IIQ", 0, 0, sector))
    return queue.add([(header, 16, False), (data, length, True), (status, 1, True)], kick=kick)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(1 << 20))
    return path


def test_blk_ops_limit_leaves_the_request_available_and_one_timer_resumes_it(image):
    from pyvmm.devices.virtio.blk import VirtioBlock

    host = ManualHost()
    device = VirtioBlock.open(image, rate_limiter=RateLimiterConfig(ops=BucketConfig(2, 1000)))
    driver = limited(device, host, device.throttle)
    queue = driver.queues[0]
    for _ in range(3):
        blk_read(driver, queue)
    assert len(queue.take_used()) == 2
    transport_queue = driver.transport.queues[0]
    assert transport_queue.next_avail == 2  # the third chain is still the driver's, not consumed
    assert host.pending_timers() == 1
    queue.kick()  # the guest kicks again: nothing is served and no second timer is armed
    blk_read(driver, queue)
    assert queue.take_used() == [] and host.pending_timers() == 1
    host.advance(0.499)
    assert queue.take_used() == []
    host.advance(0.001)  # one op per 500 ms: the third request goes, the fourth waits again
    assert len(queue.take_used()) == 1 and host.pending_timers() == 1
    host.advance(0.5)
    assert len(queue.take_used()) == 1 and host.pending_timers() == 0
    assert device.metrics.extra["throttled"] == 2
    assert device.metrics.requests == 4


def test_blk_bandwidth_counts_data_bytes_and_a_new_limit_applies_at_once(image):
    from pyvmm.devices.virtio.blk import VirtioBlock

    host = ManualHost()
    device = VirtioBlock.open(image, rate_limiter=RateLimiterConfig(bandwidth=BucketConfig(8192, 1000)))
    driver = limited(device, host, device.throttle)
    queue = driver.queues[0]
    for sector in range(0, 40, 8):
        blk_read(driver, queue, sector)
    assert len(queue.take_used()) == 2  # 2 x 4 KiB fit the 8 KiB bucket
    host.advance(0.4)
    assert queue.take_used() == []
    host.advance(0.1)  # 4096 bytes at 8192 bytes/s: 500 ms
    assert len(queue.take_used()) == 1
    device.set_rate_limiter(RateLimiterConfig())  # PATCH: no limit any more
    assert host.pending_timers() == 1  # the old wait is dropped, a kick is queued on the loop
    host.advance(0)
    assert len(queue.take_used()) == 2 and host.pending_timers() == 0


def test_rng_bandwidth_limit(tmp_path):
    from pyvmm.devices.virtio.rng import VirtioRng

    host = ManualHost()
    device = VirtioRng(rate_limiter=RateLimiterConfig(bandwidth=BucketConfig(64, 1000)))
    driver = limited(device, host, device.throttle)
    queue = driver.queues[0]
    buffers = [driver.alloc(64) for _ in range(3)]
    for addr in buffers:
        queue.add([(addr, 64, True)])
    assert queue.take_used() == [(0, 64)]
    host.advance(0.999)
    assert queue.take_used() == []
    host.advance(0.001)
    assert [length for _, length in queue.take_used()] == [64]
    host.advance(1)
    assert [length for _, length in queue.take_used()] == [64]
    assert device.metrics.extra["throttled"] == 2 and device.metrics.bytes_read == 192


@pytest.fixture
def wire():
    if not hasattr(socket, "AF_UNIX"):
        pytest.skip("needs Unix socketpairs")
    from pyvmm.devices.virtio.net import SocketBackend

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.settimeout(2)
    yield SocketBackend(ours), theirs
    ours.close()
    theirs.close()


def test_net_tx_and_rx_have_separate_limiters(wire):
    from pyvmm.devices.virtio.net import NET_HDR_SIZE, RX_QUEUE, TX_QUEUE, VirtioNet

    backend, far = wire
    host = ManualHost()
    device = VirtioNet(backend, tx_rate_limiter=RateLimiterConfig(ops=BucketConfig(1, 100)),
                       rx_rate_limiter=RateLimiterConfig(bandwidth=BucketConfig(2 * (NET_HDR_SIZE + 100), 1000)))
    driver = limited(device, host, device.rx_throttle, device.tx_throttle)
    tx, rx = driver.queues[TX_QUEUE], driver.queues[RX_QUEUE]
    frames = []
    for i in range(2):
        addr = driver.alloc(NET_HDR_SIZE + 60)
        driver.memory.write(addr + NET_HDR_SIZE, bytes([i]) * 60)
        tx.add([(addr, NET_HDR_SIZE + 60, False)])
    frames.append(far.recv(2048))
    assert len(tx.take_used()) == 1
    with pytest.raises(socket.timeout):
        far.settimeout(0.05)
        far.recv(2048)
    host.advance(0.1)  # one frame per 100 ms
    frames.append(far.recv(2048))
    assert [f[NET_HDR_SIZE] for f in frames] == [0, 1] and len(tx.take_used()) == 1
    # receive: three 100-byte frames wait at the far end; the rx bucket holds two
    for i in range(3):
        far.send(bytes(NET_HDR_SIZE) + bytes([0x10 + i]) * 100)
    for _ in range(3):
        rx.add([(driver.alloc(2048), 2048, True)])
    assert len(rx.take_used()) == 2
    assert device.metrics.extra["rx_throttled"] == 1 and device.metrics.extra["tx_throttled"] == 1
    assert host.pending_timers() == 1
    host.advance(0.5)  # (12 + 100) bytes at 224 bytes/s
    assert [length for _, length in rx.take_used()] == [NET_HDR_SIZE + 100]
    assert device.metrics.extra["rx_frames"] == 3
