"""The epoll event loop, alone and serving virtio devices on its own thread."""

import os
import socket
import threading
import time

import pytest

if not hasattr(os, "eventfd") or not hasattr(socket, "AF_UNIX"):
    pytest.skip("these event-loop tests drive Linux eventfds (tests/unit/test_host.py covers the other "
                "platforms' notifiers and pollers)", allow_module_level=True)

from conftest import wait_for  # noqa: E402
from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.mock_driver import mock_guest
from pyvmm.devices.virtio.net import NET_HDR_SIZE, RX_QUEUE, SocketBackend, VirtioNet
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.devices.virtio.status import DEVICE_NEEDS_RESET
from pyvmm.vmm.events import EventLoop, EventLoopError


def test_fd_callback_runs_on_the_loop_thread(loop):
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    seen = []

    def on_ready(events):
        os.eventfd_read(fd)
        seen.append(threading.current_thread().name)

    loop.add_fd(fd, on_ready)
    os.eventfd_write(fd, 1)
    assert wait_for(lambda: seen == ["test-events"])
    loop.remove_fd(fd)
    os.close(fd)


def test_double_registration_is_refused(loop):
    fd = os.eventfd(0)
    loop.add_fd(fd, lambda ev: None)
    with pytest.raises(EventLoopError, match="already registered"):
        loop.add_fd(fd, lambda ev: None)
    loop.remove_fd(fd)
    os.close(fd)


def test_timers_one_shot_periodic_and_cancel(loop):
    fired, ticks = [], []
    loop.call_later(0.02, lambda: fired.append(time.monotonic()))
    cancelled = loop.call_later(0.02, lambda: fired.append("cancelled"))
    cancelled.cancel()
    periodic = loop.call_every(0.01, lambda: ticks.append(1))
    assert wait_for(lambda: len(fired) == 1 and len(ticks) >= 3)
    periodic.cancel()
    count = len(ticks)
    time.sleep(0.05)
    assert len(ticks) <= count + 1
    assert "cancelled" not in fired


def test_call_soon_from_another_thread(loop):
    done = []
    threading.Thread(target=lambda: loop.call_soon(done.append, 42)).start()
    assert wait_for(lambda: done == [42])


def test_failing_callback_is_reported_and_the_loop_survives(loop):
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    errors, later = [], []

    def broken(events):
        os.eventfd_read(fd)
        raise RuntimeError("device callback bug")

    loop.add_fd(fd, broken, on_error=errors.append)
    os.eventfd_write(fd, 1)
    assert wait_for(lambda: len(errors) == 1)
    assert isinstance(errors[0], RuntimeError)
    loop.call_soon(later.append, "still running")
    assert wait_for(lambda: later == ["still running"])
    assert loop.callback_errors == 1
    loop.remove_fd(fd)
    os.close(fd)


def test_stop_is_prompt_and_clean():
    loop = EventLoop("stopper")
    loop.start()
    assert loop.running
    start = time.monotonic()
    loop.close()
    assert time.monotonic() - start < 1.0
    assert not loop.running


def test_queue_notify_served_on_the_loop_thread(loop):
    """QueueNotify writes become eventfd kicks; the device runs on the loop thread, not the caller's."""
    device = VirtioRng()
    served_on = []
    original = device.handle_request

    def recording(chain):
        served_on.append(threading.current_thread().name)
        return original(chain)

    device.handle_request = recording
    driver = mock_guest(device)
    notify_fds = driver.transport.attach(loop)
    assert len(notify_fds) == 1
    driver.setup()
    q = driver.queues[0]
    buf = driver.alloc(32)
    q.add([(buf, 32, True)])  # the bus write only signals the eventfd
    assert wait_for(lambda: q.used_idx() == 1)
    assert served_on == ["test-events"]
    # The builder can hand the same eventfd to KVM as an ioeventfd: a raw eventfd write works too.
    q.add([(buf, 32, True)], kick=False)
    notify_fds[0].notify()
    assert wait_for(lambda: q.used_idx() == 2)
    driver.transport.close()


def test_net_receive_is_driven_by_the_loop(loop):
    ours, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = VirtioNet(SocketBackend(ours))
    driver = mock_guest(device)
    driver.transport.attach(loop)
    driver.setup()
    rx = driver.queues[RX_QUEUE]
    addrs = [driver.alloc(2048) for _ in range(4)]
    for addr in addrs:
        rx.add([(addr, 2048, True)], kick=False)
    rx.kick()
    payloads = [os.urandom(64 + i) for i in range(3)]
    for payload in payloads:
        host.send(bytes(NET_HDR_SIZE) + payload)
    assert wait_for(lambda: rx.used_idx() == 3)
    for addr, payload in zip(addrs, payloads):
        assert driver.memory.read(addr + NET_HDR_SIZE, len(payload)) == payload
    assert wait_for(lambda: driver.read_reg(mmio.INTERRUPT_STATUS) & mmio.INTERRUPT_USED_BUFFER)
    driver.transport.close()
    host.close()


def test_device_exception_on_the_loop_resets_only_that_device(loop):
    bad, good = VirtioRng(), VirtioRng()

    def broken(chain):
        raise RuntimeError("bug while serving")

    bad.handle_request = broken
    bad_driver, good_driver = mock_guest(bad), mock_guest(good)
    for driver in (bad_driver, good_driver):
        driver.transport.attach(loop)
        driver.setup()
    buf = bad_driver.alloc(16)
    bad_driver.queues[0].add([(buf, 16, True)])
    assert wait_for(lambda: bad_driver.status & DEVICE_NEEDS_RESET)
    good_buf = good_driver.alloc(16)
    good_driver.queues[0].add([(good_buf, 16, True)])
    assert wait_for(lambda: good_driver.queues[0].used_idx() == 1)
    assert not good_driver.status & DEVICE_NEEDS_RESET
    assert loop.running
    for driver in (bad_driver, good_driver):
        driver.transport.close()


def test_metrics_dict(loop):
    driver = mock_guest(VirtioRng())
    driver.setup()
    buf = driver.alloc(16)
    driver.queues[0].add([(buf, 16, True)])
    metrics = driver.transport.metrics()
    assert metrics["device"] == "virtio-rng"
    assert metrics["requests"] == 1 and metrics["bytes_read"] == 16
    assert {"bytes_written", "errors", "resets", "needs_reset", "interrupts"} <= metrics.keys()
    driver.set_status(0)
    assert driver.transport.metrics()["resets"] == 1


def test_interrupt_registers_do_not_wait_for_device_io():
    """The guest's interrupt handler (a vCPU) must not block behind a batch on the loop thread."""
    driver = mock_guest(VirtioRng())
    driver.setup()
    buf = driver.alloc(16)
    driver.queues[0].add([(buf, 16, True)])
    held, release = threading.Event(), threading.Event()

    def busy_device():
        with driver.transport.lock:  # what a long blk batch looks like from a vCPU
            held.set()
            release.wait(5)

    worker = threading.Thread(target=busy_device)
    worker.start()
    assert held.wait(5)
    start = time.monotonic()
    assert driver.read_reg(mmio.INTERRUPT_STATUS) == mmio.INTERRUPT_USED_BUFFER
    driver.write_reg(mmio.INTERRUPT_ACK, mmio.INTERRUPT_USED_BUFFER)
    assert driver.irq_levels[-1] is False
    elapsed = time.monotonic() - start
    release.set()
    worker.join()
    assert elapsed < 1.0
