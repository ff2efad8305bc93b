"""virtio-net over a socketpair backend, the TAP backend's errors, and virtio-rng."""

import os
import socket
import struct

import pytest

if not hasattr(socket, "AF_UNIX") or not hasattr(socket, "SOCK_SEQPACKET") or not hasattr(os, "eventfd"):
    pytest.skip("the net tests use Unix SOCK_SEQPACKET pairs and Linux eventfds (virtio-net needs a Linux TAP)",
                allow_module_level=True)  # fmt: skip

from conftest import wait_for  # noqa: E402
from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.mock_driver import mock_guest
from pyvmm.devices.virtio.net import (
    NET_HDR_SIZE,
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    SocketBackend,
    VirtioNet,
    format_mac,
    parse_mac,
)
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.devices.virtio.status import DEVICE_NEEDS_RESET
from pyvmm.errors import DeviceError


@pytest.fixture
def wire():
    """(device backend, the host's end of the wire)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.settimeout(2)
    yield SocketBackend(ours), theirs
    ours.close()
    theirs.close()


def frame(payload: bytes) -> bytes:
    return bytes(NET_HDR_SIZE) + payload


def test_mac_from_config_and_generated():
    assert parse_mac("52:54:00:AB:cd:01") == bytes.fromhex("525400abcd01")
    generated = parse_mac(None)
    assert generated[:3] == b"\x52\x54\x00" and len(generated) == 6
    assert format_mac(bytes.fromhex("525400abcd01")) == "52:54:00:ab:cd:01"
    with pytest.raises(DeviceError, match="six hex bytes"):
        parse_mac("52:54:00")
    with pytest.raises(DeviceError, match="multicast"):
        parse_mac("01:00:5e:00:00:01")


def test_config_space_and_features(wire):
    driver = mock_guest(VirtioNet(wire[0], mac="52:54:00:12:34:56"))
    features = driver.setup()
    for bit in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS):
        assert features >> bit & 1
    assert driver.read_reg(mmio.DEVICE_ID) == 1
    assert driver.read_config(0, 6) == bytes.fromhex("525400123456")
    assert struct.unpack("<H", driver.read_config(6, 2))[0] == 1  # link up


def test_transmit(wire):
    backend, host = wire
    device = VirtioNet(backend)
    driver = mock_guest(device)
    driver.setup()
    tx = driver.queues[TX_QUEUE]
    header, body = driver.alloc(NET_HDR_SIZE), driver.alloc(60)
    payload = os.urandom(60)
    driver.memory.write(body, payload)
    tx.add([(header, NET_HDR_SIZE, False), (body, 60, False)])
    assert host.recv(2048) == frame(payload)
    assert tx.take_used() == [(0, 0)]
    assert device.metrics.extra["tx_frames"] == 1
    assert device.metrics.bytes_written == 60


def post_rx(driver, count, size):
    rx = driver.queues[RX_QUEUE]
    buffers = []
    for _ in range(count):
        addr = driver.alloc(size)
        rx.add([(addr, size, True)], kick=False)
        buffers.append(addr)
    rx.kick()
    return buffers


def test_receive_one_buffer_per_frame(wire):
    backend, host = wire
    device = VirtioNet(backend)
    driver = mock_guest(device)
    driver.setup()
    buffers = post_rx(driver, 4, 2048)
    payloads = [os.urandom(100), os.urandom(1500)]
    for payload in payloads:
        host.send(frame(payload))
    device.receive()  # what the event loop does when the fd is readable
    used = driver.queues[RX_QUEUE].take_used()
    assert [length for _, length in used] == [NET_HDR_SIZE + 100, NET_HDR_SIZE + 1500]
    for addr, payload in zip(buffers, payloads):
        header = driver.memory.read(addr, NET_HDR_SIZE)
        assert struct.unpack_from("<H", header, 10)[0] == 1  # num_buffers
        assert driver.memory.read(addr + NET_HDR_SIZE, len(payload)) == payload
    assert driver.read_reg(mmio.INTERRUPT_STATUS) & mmio.INTERRUPT_USED_BUFFER


def test_receive_merges_buffers(wire):
    backend, host = wire
    device = VirtioNet(backend)
    driver = mock_guest(device)
    driver.setup()
    buffers = post_rx(driver, 8, 512)
    payload = os.urandom(1400)
    host.send(frame(payload))
    device.receive()
    used = driver.queues[RX_QUEUE].take_used()
    assert [length for _, length in used] == [512, 512, NET_HDR_SIZE + 1400 - 1024]
    assert struct.unpack("<H", driver.memory.read(buffers[0] + 10, 2))[0] == 3
    received = b"".join(driver.memory.read(addr, length) for addr, (_, length) in zip(buffers, used))
    assert received[NET_HDR_SIZE:] == payload


def test_frame_waits_for_guest_buffers(wire):
    backend, host = wire
    device = VirtioNet(backend)
    driver = mock_guest(device)
    driver.setup()
    payload = os.urandom(200)
    host.send(frame(payload))
    device.receive()  # no buffers yet: nothing read, nothing lost
    assert driver.queues[RX_QUEUE].used_idx() == 0
    (addr,) = post_rx(driver, 1, 2048)  # the rx kick resumes delivery
    assert driver.queues[RX_QUEUE].take_used() == [(0, NET_HDR_SIZE + 200)]
    assert driver.memory.read(addr + NET_HDR_SIZE, 200) == payload


def test_frame_larger_than_buffers_waits_then_merges(wire):
    backend, host = wire
    device = VirtioNet(backend)
    driver = mock_guest(device)
    driver.setup()
    post_rx(driver, 1, 256)
    payload = os.urandom(600)
    host.send(frame(payload))
    device.receive()
    assert driver.queues[RX_QUEUE].used_idx() == 0  # one 256-byte buffer is not enough: held back
    post_rx(driver, 2, 256)
    used = driver.queues[RX_QUEUE].take_used()
    assert sum(length for _, length in used) == NET_HDR_SIZE + 600


def test_without_mergeable_a_too_small_buffer_drops_the_frame(wire):
    backend, host = wire
    device = VirtioNet(backend)
    driver = mock_guest(device)
    driver.setup(without=1 << VIRTIO_NET_F_MRG_RXBUF)
    post_rx(driver, 2, 128)
    host.send(frame(os.urandom(500)))
    host.send(frame(b"small"))
    device.receive()
    used = driver.queues[RX_QUEUE].take_used()
    assert [length for _, length in used] == [0, NET_HDR_SIZE + 5]
    assert device.metrics.extra["rx_dropped"] == 1
    assert not driver.status & DEVICE_NEEDS_RESET


def test_backend_write_failure_drops_not_crashes(wire):
    backend, host = wire
    device = VirtioNet(backend)
    driver = mock_guest(device)
    driver.setup()
    host.close()  # the peer went away: sendmsg fails
    tx = driver.queues[TX_QUEUE]
    header = driver.alloc(NET_HDR_SIZE + 60)
    tx.add([(header, NET_HDR_SIZE + 60, False)])
    assert tx.take_used() == [(0, 0)]
    assert device.metrics.extra["tx_dropped"] == 1
    assert not driver.status & DEVICE_NEEDS_RESET


def test_tap_open_failure_is_one_clear_line(monkeypatch):
    from pyvmm.devices.virtio import tap

    monkeypatch.setattr(tap, "TUN_DEVICE", "/nonexistent/tun")
    monkeypatch.setattr(tap.os, "geteuid", lambda: 1000)  # as a user: no attempt to create it
    with pytest.raises(DeviceError) as info:
        tap.TapBackend("pyvmmtest0")
    message = str(info.value)
    assert "\n" not in message and "pyvmmtest0" in message and "/nonexistent/tun" in message


def test_tap_bad_name():
    from pyvmm.devices.virtio.tap import TapBackend

    with pytest.raises(DeviceError, match="1 to 15 bytes"):
        TapBackend("x" * 20)


def test_tap_created_and_removed_when_root():
    from pyvmm.devices.virtio.tap import TapBackend

    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("creating a tap needs root and /dev/net/tun")
    name = f"pyvt{os.getpid() % 100000}"
    try:
        backend = TapBackend(name)
    except DeviceError as err:
        pytest.skip(f"this host cannot create taps: {err}")
    try:
        assert backend.created
        assert os.path.exists(f"/sys/class/net/{name}")
        assert backend.read_frame(memoryview(bytearray(2048))) is None  # non-blocking, nothing yet
    finally:
        backend.close()
    assert not os.path.exists(f"/sys/class/net/{name}")


# --- rng ---------------------------------------------------------------
def test_rng_fills_writable_buffers():
    device = VirtioRng()
    driver = mock_guest(device)
    driver.setup()
    q = driver.queues[0]
    a, b = driver.alloc(64), driver.alloc(32)
    q.add([(a, 64, True), (b, 32, True)])
    assert q.take_used() == [(0, 96)]
    data = driver.memory.read(a, 64) + driver.memory.read(b, 32)
    assert data != bytes(96)  # 2^-768 odds of a false failure
    assert device.metrics.bytes_read == 96
    assert driver.read_reg(mmio.DEVICE_ID) == 4


def test_rng_ignores_readable_buffers():
    driver = mock_guest(VirtioRng())
    driver.setup()
    q = driver.queues[0]
    a = driver.alloc(16)
    q.add([(a, 16, False)])
    assert q.take_used() == [(0, 0)]
    assert driver.memory.read(a, 16) == bytes(16)


def test_tap_round_trip_through_the_device():
    """The host ARPs for the guest through a real tap; the guest answers; the UDP datagram arrives."""
    from pyvmm.devices.virtio.tap import TapBackend
    from pyvmm.vmm.events import EventLoop

    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("a tap needs root and /dev/net/tun")
    try:
        from pyroute2 import IPRoute
    except ImportError:
        pytest.skip("pyroute2 is not installed")
    name = f"pyvr{os.getpid() % 100000}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    try:
        backend = TapBackend(name)
    except DeviceError as err:
        pytest.skip(f"this host cannot create taps: {err}")
    guest_mac = bytes.fromhex("525400c0ffee")
    device = VirtioNet(backend, mac=guest_mac)
    driver = mock_guest(device, 4 << 20)
    loop = EventLoop("tap-test")
    loop.start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=name)[0]
            ipr.addr("add", index=index, address=f"{subnet}.1", prefixlen=24)
            ipr.link("set", index=index, state="up")
        host_mac = bytes.fromhex(open(f"/sys/class/net/{name}/address").read().strip().replace(":", ""))
        driver.transport.attach(loop)
        driver.setup()
        rx, tx = driver.queues[RX_QUEUE], driver.queues[TX_QUEUE]
        buffers = [driver.alloc(2048) for _ in range(32)]
        for addr in buffers:
            rx.add([(addr, 2048, True)], kick=False)
        rx.kick()

        def frames():
            """Frames the device delivered so far (without the virtio-net header)."""
            return [driver.memory.read(buffers[h] + NET_HDR_SIZE, n - NET_HDR_SIZE) for h, n in received]

        received = []
        guest_ip = socket.inet_aton(f"{subnet}.2")
        sender.sendto(b"hello guest", (f"{subnet}.2", 9999))

        def arp_request_seen():
            received.extend(rx.take_used())
            return any(f[12:14] == b"\x08\x06" and f[38:42] == guest_ip for f in frames())

        assert wait_for(arp_request_seen, 5)
        arp_reply = (
            host_mac + guest_mac + b"\x08\x06"
            + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 2)
            + guest_mac + guest_ip + host_mac + socket.inet_aton(f"{subnet}.1")
        )
        frame_addr = driver.alloc(NET_HDR_SIZE + len(arp_reply))
        driver.memory.write(frame_addr + NET_HDR_SIZE, arp_reply)
        tx.add([(frame_addr, NET_HDR_SIZE + len(arp_reply), False)])
        assert wait_for(lambda: device.metrics.extra["tx_frames"] == 1)

        def udp_seen():
            received.extend(rx.take_used())
            return any(f[12:14] == b"\x08\x00" and f.endswith(b"hello guest") for f in frames())

        assert wait_for(udp_seen, 5)
    finally:
        sender.close()
        driver.transport.close()
        loop.close()
    assert not os.path.exists(f"/sys/class/net/{name}")
