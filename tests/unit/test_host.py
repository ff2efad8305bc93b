"""host/: the OS services each platform provides, exercised in every variant this host can run.

The Windows variants (socket-pair notifier, seek-and-read file I/O) run here too: they need
only sockets and plain file calls. What needs Windows itself (LockFileEx, msvcrt) is covered
by the simulation tests and the CI matrix.
"""

from __future__ import annotations

import os
import threading

import pytest

from pyvmm.host import fileio, poll
from pyvmm.host.notify import Notifier, default_kind

# select() on Windows watches sockets only: the pipe notifier is the other POSIX systems'
KINDS = (["pipe"] if os.name != "nt" else []) + ["socketpair"] + (["eventfd"] if hasattr(os, "eventfd") else [])
PORTABLE = "pipe" if os.name != "nt" else "socketpair"


@pytest.mark.parametrize("kind", KINDS)
def test_notifier_readable_until_cleared(kind):
    notifier = Notifier(kind)
    poller = poll._SelectorPoller()
    try:
        poller.register(notifier.fileno(), poll.READABLE)
        assert poller.poll(0) == []
        assert notifier.clear() is False
        for _ in range(3):
            notifier.notify()
        assert poller.poll(1) == [(notifier.fileno(), poll.READABLE)]
        assert notifier.clear() is True
        assert poller.poll(0) == []
    finally:
        poller.close()
        notifier.close()
    notifier.notify()  # after close: ignored, never raises


def test_default_kind_is_eventfd_on_linux():
    assert default_kind() == ("eventfd" if hasattr(os, "eventfd") else "socketpair" if os.name == "nt" else "pipe")


def test_edge_triggering_needs_epoll():
    notifier = Notifier(PORTABLE)
    poller = poll._SelectorPoller()
    try:
        with pytest.raises(poll.PollError, match="edge-triggered watching needs epoll"):
            poller.register(notifier.fileno(), poll.READABLE | poll.EDGE)
    finally:
        poller.close()
        notifier.close()


@pytest.mark.parametrize("poller_kind", ["epoll", "selectors"])
def test_event_loop_on_each_poller(monkeypatch, poller_kind):
    from pyvmm.vmm import events

    if poller_kind == "epoll" and not hasattr(poll.select, "epoll"):
        pytest.skip("no epoll on this host")
    if poller_kind == "selectors":
        monkeypatch.setattr(events, "Poller", poll._SelectorPoller)
        monkeypatch.setattr(events, "Notifier", lambda: Notifier(PORTABLE))
    loop = events.EventLoop("test")
    loop.start()
    try:
        source = Notifier(PORTABLE)
        seen = threading.Event()
        loop.add_fd(source.fileno(), lambda mask: (source.clear(), seen.set()))
        source.notify()
        assert seen.wait(2)
        timer_fired = threading.Event()
        loop.call_later(0.01, timer_fired.set)
        assert timer_fired.wait(2)
        called = threading.Event()
        loop.call_soon(called.set)
        assert called.wait(2)
        loop.remove_fd(source.fileno())
        source.close()
    finally:
        loop.close()


@pytest.fixture(params=["vectored", "positional", "seek"])
def image_file(request, tmp_path, monkeypatch):
    """An ImageFile using each I/O strategy (preadv; pread per view, as on macOS; seek+read, as on Windows)."""
    path = tmp_path / "img"
    path.write_bytes(bytes(range(256)) * 64)
    image = fileio.ImageFile(path)
    if request.param != "vectored":
        image._vectored = False
    if request.param == "seek":
        image._positional = False
    yield image
    image.close()


def test_image_io_in_every_strategy(image_file):
    views = [memoryview(bytearray(100)), memoryview(bytearray(412))]
    image_file.read_into(views, 256, 512)
    assert bytes(views[0]) + bytes(views[1]) == (bytes(range(256)) * 64)[256:768]
    out = [memoryview(b"a" * 300), memoryview(b"b" * 212)]
    image_file.write_from(out, 1024, 512)
    image_file.flush()
    back = [memoryview(bytearray(512))]
    image_file.read_into(back, 1024, 512)
    assert bytes(back[0]) == b"a" * 300 + b"b" * 212


def test_reading_past_the_end_is_an_io_error(image_file):
    with pytest.raises(OSError, match="short transfer"):
        image_file.read_into([memoryview(bytearray(512))], image_file.size - 100, 512)


def test_hole_punching_is_absent_off_linux(tmp_path, monkeypatch):
    path = tmp_path / "img"
    path.write_bytes(bytes(8192))
    monkeypatch.setattr(fileio.sys, "platform", "darwin")
    image = fileio.ImageFile(path)
    try:
        assert image.probe_fallocate() == (False, False)
        with pytest.raises(OSError, match="need Linux"):
            image.punch_hole(0, 4096)
    finally:
        image.close()


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_tap_networking_says_in_one_line_that_it_needs_linux(monkeypatch, platform):
    from pyvmm.devices.virtio import tap
    from pyvmm.errors import DeviceError

    monkeypatch.setattr(tap.sys, "platform", platform)
    with pytest.raises(DeviceError) as err:
        tap.TapBackend("tap0")
    assert str(err.value) == (f"tap 'tap0': TAP networking needs Linux (/dev/net/tun); this host is {platform}, "
                              "where [[net]] devices are not supported yet")  # fmt: skip


def test_a_file_system_without_locks_is_used_unlocked(tmp_path, monkeypatch):
    """NFS without lockd (ENOLCK) or a file system refusing flock: no lock, not a refusal to boot."""
    import errno

    fcntl = pytest.importorskip("fcntl", reason="flock is POSIX; Windows locks with LockFileEx")

    path = tmp_path / "img"
    path.write_bytes(bytes(4096))

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    image = fileio.ImageFile(path)
    try:
        assert image.lock() is False
    finally:
        image.close()


def test_an_ignored_sighup_stays_ignored(monkeypatch):
    import signal

    from pyvmm import cli

    if not hasattr(signal, "SIGHUP"):
        pytest.skip("no SIGHUP on this platform")
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        installed = cli._install_stop_signals()
        assert signal.SIGHUP not in installed and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        for signum, handler in installed.items():
            signal.signal(signum, handler)
    finally:
        signal.signal(signal.SIGHUP, previous)
