"""``HaltWait``: hlt on the userspace irqchip, shared by the interpreter and the hypervisor backends."""

import threading
import time

from pyvmm.accel.irqchip.delivery import STALE_DEADLINE_RETRY, HaltWait


class _Chip:
    def __init__(self, due):
        self.due = due
        self.clock = time.monotonic

    def next_deadline(self, index):
        return self.due


def test_a_deadline_left_in_the_past_is_retried_not_spun_on():
    chip = _Chip(time.monotonic() - 1)  # poll() did not consume it
    wait, cond = HaltWait(chip, 0), threading.Condition()
    with cond:
        started = time.monotonic()
        wait.wait(cond, lambda: False)
        first = time.monotonic() - started
        started = time.monotonic()
        wait.wait(cond, lambda: False)
        second = time.monotonic() - started
    assert first < STALE_DEADLINE_RETRY / 2, "the first time it returns at once (the caller polls the chip)"
    assert second >= STALE_DEADLINE_RETRY * 0.9, "the same stale deadline again: wait a retry interval, never spin"


def test_wait_for_sipi_ignores_timers_and_returns_when_woken():
    chip = _Chip(time.monotonic() - 1)
    wait, cond, woken = HaltWait(chip, 0), threading.Condition(), []

    def wake():
        time.sleep(0.05)
        with cond:
            woken.append(True)
            cond.notify_all()

    threading.Thread(target=wake).start()
    with cond:
        started = time.monotonic()
        wait.wait(cond, lambda: bool(woken), timers=False)
    assert woken and time.monotonic() - started >= 0.04


def test_a_future_deadline_ends_the_wait_when_it_passes():
    chip = _Chip(time.monotonic() + 0.05)
    wait, cond = HaltWait(chip, 0), threading.Condition()
    with cond:
        started = time.monotonic()
        wait.wait(cond, lambda: False)
    assert 0.04 <= time.monotonic() - started < 1
