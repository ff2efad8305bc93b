"""The vhost-user front end and device against a fake backend in a thread, on a socket pair.

The fake does what a real backend does with what it is sent: it maps the memfd at the
offsets of the memory table, turns the ring addresses back into its own mapping through the
table's user addresses, waits on the kick eventfd it was passed, serves the ring (upper-cases
what the driver wrote) and signals the call eventfd. A mock driver (devices/virtio/mock_driver.py)
drives the virtio-mmio transport from the guest side, on a real event loop.
"""

from __future__ import annotations

import mmap
import os
import selectors
import socket
import threading
import time

import pytest

from pyvmm.devices.irq import IrqLine
from pyvmm.devices.vhost_user import protocol as vu
from pyvmm.devices.vhost_user.frontend import Frontend, VhostUserError
from pyvmm.devices.vhost_user.protocol import Request
from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.fs import VirtioFs
from pyvmm.devices.virtio.mock_driver import MockDriver
from pyvmm.devices.virtio.queue import SplitQueue
from pyvmm.devices.virtio.status import DEVICE_NEEDS_RESET, VIRTIO_F_VERSION_1
from pyvmm.vmm.events import EventLoop
from pyvmm.vmm.memory import GuestMemory

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="vhost-user needs Linux (memfd, SCM_RIGHTS)")

FEATURES = 1 << 32 | 1 << 28 | 1 << 29 | 1 << vu.F_PROTOCOL_FEATURES  # VERSION_1, INDIRECT, EVENT_IDX
PROTOCOL = 1 << vu.PROTOCOL_F_MQ | 1 << vu.PROTOCOL_F_REPLY_ACK | 1 << vu.PROTOCOL_F_CONFIG


class FakeBackend(threading.Thread):
    """A vhost-user backend model. ``refuse`` = requests to NACK, ``silent`` = requests never
    answered, ``die_on`` = close the connection on that request, ``bad_reply`` = a function
    turning a reply into something broken."""

    def __init__(self, sock, *, features=FEATURES, protocol=PROTOCOL, queue_num=2, refuse=(), silent=(),
                 die_on=None, bad_reply=None):  # fmt: skip
        super().__init__(daemon=True)
        self.sock = sock
        self.features, self.protocol, self.queue_num = features, protocol, queue_num
        self.refuse, self.silent, self.die_on, self.bad_reply = set(refuse), set(silent), die_on, bad_reply
        self.log: list[tuple[str, int, int]] = []  # (request, flags, fds)
        self.acked_protocol = 0
        self.table: list[tuple[vu.MemRegion, mmap.mmap]] = []
        self.rings: dict[int, dict] = {}
        self.selector = selectors.DefaultSelector()
        self.served = 0
        self.stop_reading = threading.Event()
        self.start()

    def names(self) -> list[str]:
        return [name for name, _, _ in self.log]

    # --- the socket side ----------------------------------------------------
    def _read(self, size: int) -> tuple[bytes, list[int]]:
        data, fds = b"", []
        while len(data) < size:
            chunk, got, _, _ = socket.recv_fds(self.sock, size - len(data), 8)
            if not chunk:
                raise EOFError
            data, fds = data + chunk, fds + got
        return data, fds

    def run(self):
        self.selector.register(self.sock, selectors.EVENT_READ, None)
        try:
            while True:
                for key, _ in self.selector.select():
                    if key.data is None:
                        header, fds = self._read(12)
                        request, flags, size = vu.decode_header(header)
                        payload, more = self._read(size) if size else (b"", [])
                        if not self.handle(request, flags, payload, fds + more):
                            return
                    else:
                        self.serve(key.data)
        except (EOFError, OSError):
            pass
        finally:
            self.sock.close()

    def reply(self, request, payload):
        data = vu.encode(request, payload, reply=True)
        if self.bad_reply is not None:
            data = self.bad_reply(data)
        self.sock.sendall(data)

    def handle(self, request, flags, payload, fds) -> bool:
        name = vu.request_name(request)
        self.log.append((name, flags, len(fds)))
        if request == self.die_on:
            return False
        if request in self.silent:
            return True
        if request == Request.GET_FEATURES:
            self.reply(request, vu.u64_payload(self.features))
        elif request == Request.GET_PROTOCOL_FEATURES:
            self.reply(request, vu.u64_payload(self.protocol))
        elif request == Request.SET_PROTOCOL_FEATURES:
            self.acked_protocol = vu.decode_u64(payload)
        elif request == Request.GET_QUEUE_NUM:
            self.reply(request, vu.u64_payload(self.queue_num))
        elif request == Request.SET_MEM_TABLE:
            self.table = []  # a new table replaces the old one
            for region, fd in zip(vu.decode_mem_table(payload), fds):
                self.table.append((region, mmap.mmap(fd, region.memory_size, offset=region.mmap_offset)))
                os.close(fd)
        elif request in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.SET_VRING_ENABLE):
            index, num = vu.decode_vring_state(payload)
            self.rings.setdefault(index, {})[name] = num
        elif request == Request.SET_VRING_ADDR:
            addr = vu.decode_vring_addr(payload)
            self.rings.setdefault(addr.index, {})["addr"] = addr
        elif request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            index, has_fd = vu.decode_vring_fd(payload)
            ring = self.rings.setdefault(index, {})
            ring[name] = fds[0] if has_fd else None
            if request == Request.SET_VRING_KICK:
                ring["queue"] = self._queue(index)
                self.selector.register(fds[0], selectors.EVENT_READ, index)
        elif request == Request.GET_VRING_BASE:
            index, _ = vu.decode_vring_state(payload)
            ring = self.rings.pop(index)
            self.selector.unregister(ring["SET_VRING_KICK"])
            for key in ("SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR"):
                os.close(ring[key])
            self.reply(request, vu.vring_state_payload(index, ring["queue"].next_avail))
        if flags & vu.FLAG_NEED_REPLY and request not in vu.REPLY_SIZES:
            self.reply(request, vu.u64_payload(1 if request in self.refuse else 0))
        return True

    # --- the ring side, in the backend's own mapping ------------------------------
    def guest_address(self, user: int) -> int:
        """What a backend does: a user address of the front end -> the region it lies in."""
        for region, _ in self.table:
            if region.userspace_addr <= user < region.userspace_addr + region.memory_size:
                return region.guest_phys_addr + user - region.userspace_addr
        raise AssertionError(f"user address {user:#x} is in no region of the memory table")

    def memory(self) -> GuestMemory:
        return GuestMemory.from_buffers([(region.guest_phys_addr, buf) for region, buf in self.table])

    def _queue(self, index: int) -> SplitQueue:
        ring = self.rings[index]
        queue = SplitQueue(index, ring["SET_VRING_NUM"])
        queue.size = ring["SET_VRING_NUM"]
        addr = ring["addr"]
        queue.desc_addr, queue.avail_addr, queue.used_addr = map(self.guest_address, (addr.desc, addr.avail, addr.used))
        queue.ready = True
        queue.next_avail = ring["SET_VRING_BASE"]
        return queue

    def serve(self, index: int) -> None:
        ring = self.rings[index]
        os.eventfd_read(ring["SET_VRING_KICK"])
        memory, queue = self.memory(), ring["queue"]
        while (chain := queue.pop(memory)) is not None:
            data = b"".join(bytes(view) for view in chain.readable)
            out = data.upper()
            chain.writable[0][: len(out)] = out
            queue.add_used(memory, chain.head, len(out))
            self.served += 1
        os.eventfd_write(ring["SET_VRING_CALL"], 1)


class Rig:
    """A virtio-fs device on the fake backend, behind a transport on shared memory and an event loop."""

    def __init__(self, *, timeout=2.0, **backend):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.backend = FakeBackend(theirs, **backend)
        self.frontend = Frontend(ours, name="virtio-fs0", timeout=timeout)
        self.memory = GuestMemory.shared([(0, 4 << 20)])
        self.device = VirtioFs(self.frontend, "share", name="virtio-fs0")
        self.irq_levels: list[bool] = []
        self.transport = mmio.VirtioMmio(self.device, self.memory, IrqLine(5, lambda _irq, level: self.irq_levels.append(level)))
        self.loop = EventLoop("test-vhost")
        self.notifiers = self.transport.attach(self.loop)
        self.loop.start()
        self.driver = MockDriver(self.transport, self.memory)

    def close(self):
        self.transport.close()
        self.loop.close()
        self.backend.join(2)
        self.memory.close()


@pytest.fixture
def rig_factory():
    rigs = []

    def make(**kwargs):
        rig = Rig(**kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def wait_for(predicate, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def request_echo(rig, text: bytes, queue: int = 1) -> bytes:
    q = rig.driver.queues[queue]
    src, dst = rig.driver.alloc(len(text)), rig.driver.alloc(64)
    rig.memory.write(src, text)
    rig.driver.queues[queue].add([(src, len(text), False), (dst, 64, True)])  # kicks: QueueNotify -> eventfd
    assert wait_for(lambda: q.used_idx() != q.last_used), "the backend never used the chain"
    [(head, length)] = q.take_used()
    return rig.memory.read(dst, length)


def test_handshake_order_and_features(rig_factory):
    rig = rig_factory()
    assert rig.backend.names() == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "SET_OWNER",
                                   "GET_QUEUE_NUM"]  # fmt: skip
    assert rig.backend.acked_protocol == 1 << vu.PROTOCOL_F_MQ | 1 << vu.PROTOCOL_F_REPLY_ACK  # CONFIG not taken
    # the guest sees the ring features the backend offers, never the vhost-user-only bit
    assert rig.device.device_features() == FEATURES & ~(1 << vu.F_PROTOCOL_FEATURES)
    # config space: tag + num_request_queues
    assert rig.driver.read_config(0, 40) == b"share".ljust(36, b"\0") + (1).to_bytes(4, "little")


def test_driver_ok_starts_the_rings_and_data_flows_through_the_backend(rig_factory):
    rig = rig_factory()
    rig.driver.setup()
    names = rig.backend.names()[5:]
    per_queue = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_CALL", "SET_VRING_ERR",
                 "SET_VRING_KICK", "SET_VRING_ENABLE"]  # fmt: skip
    assert names == ["SET_FEATURES", "SET_MEM_TABLE", *per_queue, *per_queue]
    # REPLY_ACK: every request without a reply of its own asked for one after SET_PROTOCOL_FEATURES
    assert all(flags & vu.FLAG_NEED_REPLY for name, flags, _ in rig.backend.log[5:])
    assert not rig.backend.log[2][1] & vu.FLAG_NEED_REPLY  # not yet for SET_PROTOCOL_FEATURES itself
    # fds travelled: one per region, one per KICK/CALL/ERR
    fds = {name: count for name, _, count in rig.backend.log[5:]}
    assert fds["SET_MEM_TABLE"] == 1 and fds["SET_VRING_KICK"] == 1 and fds["SET_VRING_CALL"] == 1
    [(region, _)] = rig.backend.table
    assert (region.guest_phys_addr, region.memory_size, region.mmap_offset) == (0, 4 << 20, 0)
    # the ring addresses translate back to the driver's guest-physical rings
    for index, queue in enumerate(rig.driver.queues):
        addr = rig.backend.rings[index]["addr"]
        assert [rig.backend.guest_address(a) for a in (addr.desc, addr.avail, addr.used)] == [queue.desc, queue.avail, queue.used]
    # a request: the kick reaches the backend (pyvmm does not drain the notifier), the call comes back
    assert request_echo(rig, b"hello vhost-user") == b"HELLO VHOST-USER"
    assert wait_for(lambda: rig.transport.interrupt_status & mmio.INTERRUPT_USED_BUFFER)
    assert rig.irq_levels[-1] is True
    assert request_echo(rig, b"again", queue=0) == b"AGAIN"
    assert rig.backend.served == 2 and rig.transport.status & DEVICE_NEEDS_RESET == 0


def test_reset_stops_the_rings_and_the_driver_brings_them_back(rig_factory):
    rig = rig_factory()
    rig.driver.setup()
    assert request_echo(rig, b"one") == b"ONE"
    rig.driver.set_status(0)
    assert rig.backend.names()[-2:] == ["GET_VRING_BASE", "GET_VRING_BASE"]
    assert rig.backend.rings == {}
    rig.driver.setup()
    assert rig.transport.status & DEVICE_NEEDS_RESET == 0, rig.transport.last_error
    assert request_echo(rig, b"two") == b"TWO"


def test_without_protocol_features(rig_factory):
    rig = rig_factory(features=1 << 32, protocol=0)
    # without REPLY_ACK nothing waits for SET_OWNER: give the backend's thread its time
    assert wait_for(lambda: rig.backend.names() == ["GET_FEATURES", "SET_OWNER"]), rig.backend.names()
    rig.driver.setup()
    assert "SET_VRING_ENABLE" not in rig.backend.names()  # rings start enabled without protocol features
    assert not any(flags & vu.FLAG_NEED_REPLY for _, flags, _ in rig.backend.log)
    assert request_echo(rig, b"plain") == b"PLAIN"


def test_backend_with_too_few_queues_is_refused():
    ours, theirs = socket.socketpair()
    backend = FakeBackend(theirs, queue_num=1)
    with pytest.raises(VhostUserError, match="serves 1 queues; this device needs 2"):
        VirtioFs(Frontend(ours, name="fs"), "t", name="fs")
    ours.close()
    backend.join(2)


def test_a_refused_request_fails_the_device_with_one_line(rig_factory):
    rig = rig_factory(refuse={Request.SET_MEM_TABLE})
    rig.driver.setup()
    assert rig.transport.status & DEVICE_NEEDS_RESET
    assert rig.transport.last_error == "virtio-fs0: the vhost-user backend refused SET_MEM_TABLE (status 1)"


def test_a_failure_half_way_stops_the_rings_that_started(rig_factory):
    rig = rig_factory(refuse={Request.SET_VRING_ENABLE})
    rig.driver.setup()
    assert rig.transport.status & DEVICE_NEEDS_RESET
    assert rig.backend.names()[-2:] == ["SET_VRING_ENABLE", "GET_VRING_BASE"]  # queue 0 stopped again
    assert rig.backend.rings == {}
    rig.backend.refuse.clear()
    rig.driver.setup()  # the driver resets and tries again
    assert rig.transport.status & DEVICE_NEEDS_RESET == 0
    assert request_echo(rig, b"recovered") == b"RECOVERED"


def test_a_ring_that_never_started_is_not_stopped(rig_factory):
    rig = rig_factory(refuse={Request.SET_VRING_ADDR})
    rig.driver.setup()
    assert rig.transport.status & DEVICE_NEEDS_RESET
    assert "GET_VRING_BASE" not in rig.backend.names() and rig.backend.names()[-1] == "SET_VRING_ADDR"
    assert "refused SET_VRING_ADDR" in rig.transport.last_error


def test_a_silent_backend_times_out(rig_factory):
    ours, theirs = socket.socketpair()
    backend = FakeBackend(theirs, silent={Request.GET_FEATURES})
    started = time.monotonic()
    with pytest.raises(VhostUserError, match=r"^fs: GET_FEATURES: no reply from the vhost-user backend within 0.3 s$"):
        VirtioFs(Frontend(ours, name="fs", timeout=0.3), "t", name="fs")
    assert 0.25 < time.monotonic() - started < 2
    ours.close()
    backend.join(2)


def test_a_backend_silent_at_driver_ok_costs_the_vcpu_one_timeout(rig_factory):
    rig = rig_factory(timeout=0.3, silent={Request.GET_VRING_BASE})
    rig.driver.setup()
    started = time.monotonic()
    rig.driver.set_status(0)  # reset: GET_VRING_BASE is never answered
    assert time.monotonic() - started < 1.5  # one timeout, then the connection is known broken
    try:
        rig.driver.setup()
    except AssertionError:
        pass  # the broken connection may be found while the driver negotiates: FEATURES_OK refused
    assert rig.transport.status & DEVICE_NEEDS_RESET
    # (which failure the transport names last depends on when the broken connection is noticed)
    assert rig.frontend.broken.startswith("GET_VRING_BASE: no reply from the vhost-user backend")


def test_backend_death_fails_the_device_not_the_vmm(rig_factory):
    rig = rig_factory()
    rig.driver.setup()
    assert request_echo(rig, b"alive") == b"ALIVE"
    rig.backend.sock.shutdown(socket.SHUT_RDWR)  # the backend dies
    assert wait_for(lambda: rig.transport.status & DEVICE_NEEDS_RESET)
    assert rig.transport.last_error == "virtio-fs0: the vhost-user backend closed the connection"
    assert rig.transport.interrupt_status & mmio.INTERRUPT_CONFIG_CHANGE
    rig.driver.set_status(0)  # the reset does not wait on a dead backend
    rig.driver.setup()
    assert rig.transport.status & DEVICE_NEEDS_RESET
    assert "\n" not in rig.transport.last_error


def test_a_message_nobody_asked_for_fails_the_device(rig_factory):
    rig = rig_factory()
    rig.driver.setup()
    rig.backend.sock.sendall(vu.encode(Request.GET_FEATURES, vu.u64_payload(0), reply=True))
    assert wait_for(lambda: rig.transport.status & DEVICE_NEEDS_RESET)
    assert rig.transport.last_error == "virtio-fs0: the vhost-user backend sent a message nobody asked for"


def test_death_in_the_middle_of_a_request(rig_factory):
    rig = rig_factory(die_on=Request.SET_MEM_TABLE)
    rig.driver.setup()
    assert rig.transport.status & DEVICE_NEEDS_RESET
    assert rig.transport.last_error == "virtio-fs0: SET_MEM_TABLE: the vhost-user backend closed the connection"


@pytest.mark.parametrize("corrupt, problem", [
    (lambda d: d[:4] + (0x1).to_bytes(4, "little") + d[8:], "without the REPLY flag"),
    (lambda d: (2).to_bytes(4, "little") + d[4:], "answered SET_FEATURES"),
    (lambda d: d[:4] + (0x6).to_bytes(4, "little") + d[8:], "protocol version 2"),
    (lambda d: d[:8] + (4).to_bytes(4, "little") + d[12:16], "reply payload of 4 bytes"),
    (lambda d: d[:8] + (1 << 20).to_bytes(4, "little") + d[12:], "exceeds"),
])  # fmt: skip
def test_bad_replies_are_refused(corrupt, problem):
    ours, theirs = socket.socketpair()
    backend = FakeBackend(theirs, bad_reply=corrupt)
    frontend = Frontend(ours, name="fs", timeout=0.5)
    with pytest.raises(VhostUserError, match=problem):
        frontend.get_features()
    assert frontend.broken
    with pytest.raises(VhostUserError, match="unusable"):
        frontend.get_features()  # a confused connection is never trusted again
    ours.close()
    backend.join(2)


def test_a_reply_with_fds_is_refused_and_the_fds_closed():
    ours, theirs = socket.socketpair()
    frontend = Frontend(ours, name="fs", timeout=0.5)
    stray = os.eventfd(0)

    def answer():
        socket.recv_fds(theirs, 12, 1)
        socket.send_fds(theirs, [vu.encode(Request.GET_FEATURES, vu.u64_payload(1), reply=True)], [stray])

    thread = threading.Thread(target=answer)
    thread.start()
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(VhostUserError, match="unexpected fd"):
        frontend.get_features()
    thread.join()
    assert len(os.listdir("/proc/self/fd")) == before  # the received copy was closed
    for fd in (stray,):
        os.close(fd)
    ours.close()
    theirs.close()


def test_mem_table_carries_every_region_with_its_file_offset():
    """Two RAM regions (below and above a hole) in one memfd: offsets follow each other."""
    memory = GuestMemory.shared([(0, 2 << 20), (8 << 20, 1 << 20)])
    ours, theirs = socket.socketpair()
    backend = FakeBackend(theirs)
    try:
        from pyvmm.devices.vhost_user.device import UserAddresses

        addresses = UserAddresses(memory)
        frontend = Frontend(ours, name="fs")
        frontend.set_mem_table([vu.MemRegion(r.guest_addr, r.size, user, r.fd_offset)
                                for r, (_, _, user) in zip(memory.regions, addresses.regions)],
                               [r.fd for r in memory.regions])  # fmt: skip
        frontend.get_features()  # a round trip: the table has been handled
        assert [(r.guest_phys_addr, r.memory_size, r.mmap_offset) for r, _ in backend.table] == [
            (0, 2 << 20, 0), (8 << 20, 1 << 20, 2 << 20)]  # fmt: skip
        memory.write((8 << 20) + 100, b"seen by the backend")
        assert backend.memory().read((8 << 20) + 100, 19) == b"seen by the backend"
        assert addresses.translate((8 << 20) + 0x10, 16) == addresses.regions[1][2] + 0x10
        with pytest.raises(VhostUserError, match="not inside one RAM region"):
            addresses.translate((2 << 20) - 8, 16)
    finally:
        ours.close()
        backend.join(2)
        memory.close()
