"""Guest-triggered log lines are rate-limited per device and kind; counters keep the full numbers."""

import logging
import random

from pyvmm.devices import guestlog
from pyvmm.devices.guestlog import GuestLog
from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.mock_driver import mock_guest
from pyvmm.devices.virtio.rng import VirtioRng


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_first_lines_then_a_count(caplog):
    clock = Clock()
    log = GuestLog(logging.getLogger("t"), "dev0", clock=clock, burst=3, window=10)
    with caplog.at_level(logging.INFO, logger="t"):
        for i in range(100):
            log.warning("bad", "bad request %d", i)
        log.info("other", "another kind is counted apart")
        assert [r.getMessage() for r in caplog.records][:3] == ["bad request 0", "bad request 1",
                                                               "bad request 2 (more 'bad' messages from dev0 are "
                                                               "counted, not logged, for 10 s)"]  # fmt: skip
        assert len(caplog.records) == 4 and log.suppressed == {"bad": 97}
        clock.now = 11
        log.warning("bad", "bad request %d", 100)
        assert caplog.records[4].getMessage() == "dev0: 97 more 'bad' messages were suppressed"
        assert caplog.records[5].getMessage() == "bad request 100"
        log.warning("bad", "x")
        log.warning("bad", "y")
        log.warning("bad", "z")  # suppressed again, in the new window
        log.flush()
        assert caplog.records[-1].getMessage() == "dev0: 1 more 'bad' messages were suppressed"


def test_random_register_writes_cannot_flood_the_log(caplog):
    """The reported flood: random virtio-mmio register writes made ~1 warning per 3 accesses."""
    driver = mock_guest(VirtioRng())
    rng = random.Random(7)
    with caplog.at_level(logging.DEBUG, logger="pyvmm"):
        caplog.clear()
        for _ in range(6000):
            offset = rng.choice([mmio.STATUS, mmio.QUEUE_NUM, mmio.QUEUE_READY, mmio.DRIVER_FEATURES, mmio.QUEUE_SEL,
                                 mmio.QUEUE_DESC_LOW, mmio.DRIVER_FEATURES_SEL])  # fmt: skip
            driver.write_reg(offset, rng.getrandbits(8))
    counters = driver.transport.metrics()
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert counters["needs_reset"] > 200  # the guest broke the rules hundreds of times ...
    assert len(lines) <= 4 * guestlog.BURST  # ... and the log shows a handful of lines
    assert driver.transport.guest_log.suppressed.get("needs reset", 0) + min(guestlog.BURST, counters["needs_reset"]) \
        == counters["needs_reset"]
