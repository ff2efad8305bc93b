"""virtio-vsock: the packet codec, the handshake both ways, data and credit both ways, shutdown and
RST, device reset, snapshots' transport reset, and Firecracker's host-side convention, driven through
the mock driver and real Unix sockets in tmp_path."""

from __future__ import annotations

import os
import socket
import struct

import pytest

if not hasattr(socket, "AF_UNIX"):
    pytest.skip("virtio-vsock bridges to Unix sockets", allow_module_level=True)

from vsock_guest import GUEST_CID, VsockGuest  # noqa: E402

from pyvmm.devices.virtio import mmio  # noqa: E402
from pyvmm.devices.virtio.mock_driver import ManualHost, mock_guest  # noqa: E402
from pyvmm.devices.virtio.status import DEVICE_NEEDS_RESET  # noqa: E402
from pyvmm.devices.virtio.vsock.connection import Connection, Reaction, State  # noqa: E402
from pyvmm.devices.virtio.vsock.device import FIRST_LOCAL_PORT, VirtioVsock, check_guest_cid  # noqa: E402
from pyvmm.devices.virtio.vsock.packet import (  # noqa: E402
    HEADER_SIZE,
    HOST_CID,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    Header,
    gather,
    scatter,
    slice_views,
)
from pyvmm.errors import DeviceError  # noqa: E402


@pytest.fixture
def uds(tmp_path):
    return str(tmp_path / "v.sock")


@pytest.fixture
def guest(uds):
    device = VirtioVsock(GUEST_CID, uds)
    g = VsockGuest(device)
    yield g
    device.close()


def listen(path: str) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    server.settimeout(2)
    return server


def host_connect(g: VsockGuest, uds: str, port: int) -> tuple[socket.socket, Header]:
    """A host process connects through uds_path to guest ``port``; the guest accepts."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(2)
    client.connect(uds)
    client.sendall(b"CONNECT %d\n" % port)
    request = g.accept_request(port)
    g.pump()
    return client, request


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, f"EOF after {line!r}"
        line += chunk
    return line


def guest_connect(g: VsockGuest, uds: str, host_port: int, guest_port: int = 5000):
    """The guest connects to CID 2 ``host_port`` (bridged to uds_path_<port>); (server, accepted socket)."""
    server = listen(f"{uds}_{host_port}")
    answer = g.connect(guest_port, host_port)
    assert answer.op == OP_RESPONSE, answer
    peer, _ = server.accept()
    peer.settimeout(2)
    return server, peer


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, f"EOF after {len(data)} of {count} bytes"
        data += chunk
    return bytes(data)


def assert_eof(sock: socket.socket) -> None:
    sock.settimeout(2)
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return
        if not chunk:
            return


# --- the codec and the connection, no sockets -----------------------------------------------------------
def test_header_layout_is_44_little_endian_bytes():
    hdr = Header(3, 2, 1024, 52, 7, TYPE_STREAM, OP_RW, 0, 262144, 99)
    raw = hdr.pack()
    assert len(raw) == HEADER_SIZE == 44
    assert raw[:8] == (3).to_bytes(8, "little") and raw[8:16] == (2).to_bytes(8, "little")
    assert struct.unpack_from("<IIIHHIII", raw, 16) == (1024, 52, 7, TYPE_STREAM, OP_RW, 0, 262144, 99)
    assert Header.unpack(raw) == hdr


def test_scatter_and_gather_cross_buffer_boundaries():
    parts = [bytearray(5), bytearray(30), bytearray(20)]
    views = [memoryview(p) for p in parts]
    data = bytes(range(50))
    assert scatter(views, data) == 50
    assert gather(views, 0, 50) == data
    assert gather(views, 3, 40) == data[3:43]
    assert b"".join(bytes(v) for v in slice_views(views, 33, 100)) == data[33:] + bytes(5)


def test_connection_credit_arithmetic_wraps_like_u32():
    conn = Connection(GUEST_CID, 1 << 30, 52, host_initiated=False, buf_alloc=1000)
    conn.receive(Header(GUEST_CID, 2, 52, 1 << 30, 0, TYPE_STREAM, OP_CREDIT_UPDATE, 0, 4096, 0xFFFFFF00))
    conn.tx_cnt = 0xFFFFFF00 + 96  # we sent 96 bytes the guest has not consumed, across the u32 wrap
    conn.tx_cnt &= 0xFFFFFFFF
    assert conn.peer_credit() == 4096 - 96
    # the guest may send at most buf_alloc not yet forwarded; one byte more is a reset
    assert conn.receive(Header(GUEST_CID, 2, 52, 1 << 30, 1000, TYPE_STREAM, OP_RW, 0, 4096, 0)) is Reaction.DATA
    assert conn.receive(Header(GUEST_CID, 2, 52, 1 << 30, 1, TYPE_STREAM, OP_RW, 0, 4096, 0)) is Reaction.RESET
    assert conn.state is State.CLOSED and conn.next_control().op == OP_RST


def test_check_guest_cid():
    assert check_guest_cid(3) == 3 and check_guest_cid(0xFFFFFFFE) == 0xFFFFFFFE
    for bad in (0, 1, 2, 0xFFFFFFFF, 1 << 40, -3, True, "3"):
        with pytest.raises(DeviceError, match="guest CID"):
            check_guest_cid(bad)


# --- the device --------------------------------------------------------------------------------------------
def test_identity_and_config_space(guest):
    driver = guest.driver
    assert driver.read_reg(mmio.DEVICE_ID) == 19
    assert len(driver.transport.queues) == 3
    assert struct.unpack("<Q", driver.read_config(0, 8))[0] == GUEST_CID
    # Linux reads the le64 as two 32-bit halves
    assert driver.read_config(0, 4) + driver.read_config(4, 4) == struct.pack("<Q", GUEST_CID)


def test_uds_path_is_refused_when_in_use_or_not_a_socket(tmp_path, uds):
    busy = VirtioVsock(GUEST_CID, uds)
    try:
        with pytest.raises(DeviceError, match="in use"):
            VirtioVsock(GUEST_CID, uds)
    finally:
        busy.close()
    assert not os.path.exists(uds)  # close() removes the socket file
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(DeviceError, match="not a socket"):
        VirtioVsock(GUEST_CID, str(plain))
    with pytest.raises(DeviceError, match="cannot listen"):
        VirtioVsock(GUEST_CID, str(tmp_path / "missing" / "v.sock"))
    # a stale socket file (its VMM is gone) is replaced
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(uds)
    stale.close()
    VirtioVsock(GUEST_CID, uds).close()


def test_host_initiated_handshake_and_data_both_ways(guest, uds):
    client, request = host_connect(guest, uds, 52)
    assert (request.src_cid, request.dst_cid, request.dst_port, request.type) == (HOST_CID, GUEST_CID, 52, TYPE_STREAM)
    assert request.src_port >= FIRST_LOCAL_PORT
    assert request.buf_alloc == guest.device.buf_alloc
    assert read_line(client) == b"OK %d\n" % request.src_port
    host_port = request.src_port
    # host -> guest
    client.sendall(b"hello guest")
    guest.pump()
    data, others = guest.read_stream(52)
    assert data == b"hello guest" and not others
    # guest -> host
    guest.send(guest.header(OP_RW, 52, host_port, length=10), b"hello host")
    assert recv_exactly(client, 10) == b"hello host"
    extra = guest.device.metrics.extra
    assert extra["connections_opened"] == 1
    assert extra["bytes_to_guest"] == 11 and extra["bytes_from_guest"] == 10
    client.close()


def test_host_data_sent_with_the_connect_line_waits_for_the_guest(guest, uds):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(2)
    client.connect(uds)
    client.sendall(b"CONNECT 7\nearly bytes")
    request = guest.accept_request(7)
    guest.pump()
    assert read_line(client) == b"OK %d\n" % request.src_port
    assert guest.read_stream(7)[0] == b"early bytes"
    client.close()


def test_guest_refusal_and_silence_close_the_host_socket(guest, uds):
    refused = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    refused.connect(uds)
    refused.sendall(b"CONNECT 99\n")
    guest.pump()
    (request, _), = guest.recv()
    guest.send(guest.header(OP_RST, 99, request.src_port))
    assert_eof(refused)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(uds)
    silent.sendall(b"CONNECT 98\n")
    guest.pump()
    (request, _), = guest.recv()
    guest.host.advance(guest.device.connect_timeout + 1)
    assert_eof(silent)
    (rst, _), = guest.recv()
    assert rst.op == OP_RST and rst.dst_port == 98
    assert guest.device.links == {}


@pytest.mark.parametrize("line", [b"CONNECT\n", b"CONNECT x\n", b"CONNECT 99999999999\n", b"HELLO 5\n", b"C" * 40])
def test_bad_connect_lines_are_closed(guest, uds, line):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(uds)
    client.sendall(line)
    guest.pump()
    assert_eof(client)
    assert guest.recv() == [] and guest.device.links == {}


def test_guest_initiated_connection_is_bridged_to_uds_path_port(guest, uds):
    server, peer = guest_connect(guest, uds, 1234, guest_port=5000)
    guest.send(guest.header(OP_RW, 5000, 1234, length=5), b"ping\n")
    assert recv_exactly(peer, 5) == b"ping\n"
    peer.sendall(b"pong\n")
    guest.pump()
    data, _ = guest.read_stream(5000)
    assert data == b"pong\n"
    server.close()
    peer.close()


def test_guest_connect_with_nobody_listening_gets_rst(guest, uds):
    answer = guest.connect(5001, 4321)
    assert answer.op == OP_RST and (answer.src_port, answer.dst_port) == (4321, 5001)
    assert guest.device.links == {}


def test_packets_for_no_connection_get_rst_but_rst_gets_nothing(guest):
    guest.send(guest.header(OP_RW, 6000, 77, length=3), b"abc")
    (rst, _), = guest.recv()
    assert rst.op == OP_RST and rst.dst_port == 6000
    guest.send(guest.header(OP_RST, 6000, 77))
    assert guest.recv() == []


def test_device_never_overruns_the_guest_credit_and_resumes_on_credit_update(uds):
    device = VirtioVsock(GUEST_CID, uds)
    g = VsockGuest(device, buf_alloc=16 << 10)
    try:
        server, peer = guest_connect(g, uds, 80)
        payload = os.urandom(100 << 10)
        peer.setblocking(False)
        sent = peer.send(payload)
        received = bytearray()
        for _ in range(200):
            g.pump()
            chunk, _ = g.read_stream(5000, consume=False)
            received += chunk
            # the device had at most the guest's advertised buffer in flight
            assert len(received) - g.fwd_cnt <= g.buf_alloc
            if not chunk:
                if len(received) - g.fwd_cnt == g.buf_alloc:
                    # the guest has no room left: the device must stop, and the rest stays in the socket
                    g.pump()
                    assert g.read_stream(5000, consume=False)[0] == b""
                    g.consume(len(received) - g.fwd_cnt)
                    g.credit_update(5000, 80)
                elif len(received) >= len(payload):
                    break
                else:
                    try:
                        sent += peer.send(payload[sent:])
                    except BlockingIOError:
                        pass
        assert bytes(received) == payload
        assert device.metrics.extra["bytes_to_guest"] == len(payload)
        server.close()
        peer.close()
    finally:
        device.close()


def test_no_host_reads_without_receive_buffers(uds):
    device = VirtioVsock(GUEST_CID, uds)
    g = VsockGuest(device, rx_buffers=4)
    try:
        server, peer = guest_connect(g, uds, 81)  # the RESPONSE's buffer is posted again: 4 posted
        blob = os.urandom(64 << 10)
        peer.sendall(blob)
        g.pump()
        packets = g.recv(repost=False)
        assert [len(p) for _, p in packets] == [4096] * 4
        g.pump()
        assert g.recv(repost=False) == []  # starved: nothing read, nothing lost
        assert list(g.host.watched) == [device.listener.fileno()]  # the stream's socket is not even watched
        g.post_rx(4)
        g.pump()
        more = g.recv(repost=False)
        assert b"".join(p for _, p in packets + more) == blob[: 8 * 4096]
        server.close()
        peer.close()
    finally:
        device.close()


def test_guest_beyond_our_credit_is_reset(uds):
    device = VirtioVsock(GUEST_CID, uds, buf_alloc=8192)
    g = VsockGuest(device)
    try:
        server, peer = guest_connect(g, uds, 82)
        # the host does not read: once its socket is full the device holds guest bytes, up to buf_alloc
        link = device.links[(82, 5000)]
        for _ in range(10000):
            room = link.conn.buf_alloc - link.conn.pending_to_host()
            if not room:
                break
            g.send(g.header(OP_RW, 5000, 82, length=room), bytes(room))
        assert link.conn.pending_to_host() == len(link.out) == 8192
        assert device.metrics.extra["connections_reset"] == 0
        g.recv()
        # one byte beyond the credit: the stream is reset, its host socket closed
        g.send(g.header(OP_RW, 5000, 82, length=1), b"x")
        assert [h.op for h, _ in g.recv()] == [OP_RST]
        assert (82, 5000) not in device.links
        assert device.metrics.extra["connections_reset"] == 1
        server.close()
        peer.close()
    finally:
        device.close()


def test_backpressure_from_a_slow_host_and_credit_updates_as_it_drains(uds):
    """The guest sends only what the device's packets advertise; a host that stops reading stops
    the guest (no credit update comes) without the device buffering more than its buf_alloc, and
    credit comes back as the host drains."""
    device = VirtioVsock(GUEST_CID, uds, buf_alloc=64 << 10)
    g = VsockGuest(device)
    try:
        server, peer = guest_connect(g, uds, 83)
        peer.setblocking(False)
        peer_buf_alloc, peer_fwd_cnt = 64 << 10, 0  # from the device's RESPONSE
        blob = os.urandom(1 << 20)
        sent, got, updates, stalls = 0, bytearray(), 0, 0
        while len(got) < len(blob):
            credit = peer_buf_alloc - (sent - peer_fwd_cnt)
            size = min(credit, 16 << 10, len(blob) - sent)
            if size > 0:
                g.send(g.header(OP_RW, 5000, 83, length=size), blob[sent : sent + size])
                sent += size
            else:
                stalls += 1
                # the host is not reading: nothing comes to free the guest
                g.pump()
                assert [h for h, _ in g.recv() if h.op == OP_CREDIT_UPDATE] == []
                got += peer.recv(24 << 10)  # the host reads a little
            link = device.links[(83, 5000)]
            assert link.conn.pending_to_host() <= 64 << 10
            assert len(link.out) <= 64 << 10
            g.pump()
            for hdr, _ in g.recv():
                assert hdr.op == OP_CREDIT_UPDATE
                updates += 1
                peer_buf_alloc, peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
            if sent == len(blob):
                got += recv_exactly(peer, len(blob) - len(got)) if len(blob) > len(got) else b""
        assert bytes(got) == blob
        assert stalls > 0 and updates > 0
        assert device.metrics.extra["bytes_from_guest"] == len(blob)
        assert device.metrics.extra["connections_reset"] == 0
        server.close()
        peer.close()
    finally:
        device.close()


def test_credit_updates_follow_the_host_draining(uds):
    device = VirtioVsock(GUEST_CID, uds, buf_alloc=64 << 10)
    g = VsockGuest(device)
    try:
        server, peer = guest_connect(g, uds, 84)
        g.send(g.header(OP_RW, 5000, 84, length=20000), bytes(20000))
        # a quarter of the buffer (16 KiB) went to the host socket: the guest hears about it
        (update, _), = g.recv()
        assert update.op == OP_CREDIT_UPDATE and update.fwd_cnt == 20000 and update.buf_alloc == 64 << 10
        g.send(g.header(OP_CREDIT_REQUEST, 5000, 84))
        (update, _), = g.recv()
        assert update.op == OP_CREDIT_UPDATE and update.fwd_cnt == 20000
        server.close()
        peer.close()
    finally:
        device.close()


def test_guest_rst_closes_the_host_socket(guest, uds):
    server, peer = guest_connect(guest, uds, 85)
    guest.send(guest.header(OP_RST, 5000, 85))
    assert_eof(peer)
    assert guest.device.links == {}
    assert guest.device.metrics.extra["connections_reset"] == 1
    server.close()


def test_guest_full_shutdown_flushes_then_ends_with_rst(guest, uds):
    server, peer = guest_connect(guest, uds, 86)
    guest.send(guest.header(OP_RW, 5000, 86, length=6), b"last\n!")
    guest.send(guest.header(OP_SHUTDOWN, 5000, 86, flags=SHUTDOWN_BOTH))
    (rst, _), = guest.recv()
    assert rst.op == OP_RST
    assert recv_exactly(peer, 6) == b"last\n!"
    assert_eof(peer)
    extra = guest.device.metrics.extra
    assert extra["connections_closed"] == 1 and extra["connections_reset"] == 0
    server.close()


def test_half_close_both_ways(guest, uds):
    server, peer = guest_connect(guest, uds, 87)
    # the guest stops sending: the host reads EOF but can still answer
    guest.send(guest.header(OP_SHUTDOWN, 5000, 87, flags=SHUTDOWN_SEND))
    assert peer.recv(10) == b""
    peer.sendall(b"answer")
    peer.shutdown(socket.SHUT_WR)
    guest.pump()
    packets = guest.recv()
    data = b"".join(p for h, p in packets if h.op == OP_RW)
    ops = [h.op for h, _ in packets]
    assert data == b"answer"
    # the host's EOF with the guest already done: the closing RST, after the data
    assert ops[-1] == OP_RST and ops.count(OP_RST) == 1
    assert guest.device.links == {}
    server.close()


def test_host_close_sends_shutdown_and_guest_close_finishes(guest, uds):
    server, peer = guest_connect(guest, uds, 88)
    peer.close()
    guest.pump()
    (shutdown, _), = guest.recv()
    assert shutdown.op == OP_SHUTDOWN and shutdown.flags & SHUTDOWN_SEND
    guest.send(guest.header(OP_SHUTDOWN, 5000, 88, flags=SHUTDOWN_BOTH))
    (rst, _), = guest.recv()
    assert rst.op == OP_RST and guest.device.links == {}
    server.close()


def test_guest_rcv_shutdown_stops_host_reads(guest, uds):
    server, peer = guest_connect(guest, uds, 89)
    guest.send(guest.header(OP_SHUTDOWN, 5000, 89, flags=SHUTDOWN_RCV))
    peer.sendall(b"unwanted")
    guest.pump()
    assert guest.read_stream(5000)[0] == b""
    server.close()
    peer.close()


def test_driver_reset_ends_every_connection_and_new_ones_work(guest, uds):
    server, peer = guest_connect(guest, uds, 90)
    client, _request = host_connect(guest, uds, 91)
    assert read_line(client).startswith(b"OK ")
    guest.driver.set_status(0)  # the driver resets the device (module unload, unbind)
    assert_eof(peer)
    assert_eof(client)
    assert guest.device.links == {}
    assert guest.device.metrics.extra["connections_closed"] == 2
    # the driver comes back: new connections work both ways
    fresh = VsockGuest.__new__(VsockGuest)
    fresh.__dict__.update(guest.__dict__)
    guest.driver.queues = []
    guest.driver.setup()
    guest.rx, guest.tx, guest.events = guest.driver.queues
    guest._rx_slots.clear()
    guest._free_pairs = [(guest.driver.alloc(HEADER_SIZE), guest.driver.alloc(4096)) for _ in range(16)]
    guest.post_rx(16)
    peer2 = guest_connect(guest, uds, 92, guest_port=5002)[1]
    guest.send(guest.header(OP_RW, 5002, 92, length=3), b"new")
    assert recv_exactly(peer2, 3) == b"new"
    client2, request = host_connect(guest, uds, 93)
    assert read_line(client2) == b"OK %d\n" % request.src_port
    for s in (server, peer2, client2):
        s.close()


def test_host_connect_while_no_driver_is_closed(uds):
    device = VirtioVsock(GUEST_CID, uds)
    g = VsockGuest(device)
    try:
        g.driver.set_status(0)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(uds)
        client.sendall(b"CONNECT 5\n")
        g.pump()
        assert_eof(client)
    finally:
        device.close()


def test_malformed_packets_cost_the_packet_or_an_rst_never_the_device(guest, uds):
    device = guest.device
    server, peer = guest_connect(guest, uds, 94)
    errors = device.metrics.errors
    # a wrong source CID: dropped without an answer (it cannot be addressed)
    guest.send(guest.header(OP_RW, 5000, 94, length=2, src_cid=7), b"no")
    assert guest.recv() == [] and device.metrics.errors == errors + 1
    # a header shorter than 44 bytes: dropped
    guest.send_raw([bytes(20)])
    assert guest.recv() == []
    # len beyond the descriptors: the stream ends with an RST
    guest.send_raw([guest.header(OP_RW, 5000, 94, length=1000).pack(), b"short"])
    assert [h.op for h, _ in guest.recv()] == [OP_RST]
    assert_eof(peer)
    # an unknown op, or a second REQUEST, on an established stream: RST, and the host socket closes
    for port, bad in ((95, guest.header(99, 5001, 95)), (96, guest.header(OP_REQUEST, 5001, 96))):
        server2, peer2 = guest_connect(guest, uds, port, guest_port=5001)
        guest.send(bad)
        assert [h.op for h, _ in guest.recv()] == [OP_RST]
        assert_eof(peer2)
        server2.close()
    # seqpacket and other CIDs do not exist here
    guest.send(guest.header(OP_REQUEST, 5003, 95, type_=2))
    guest.send(guest.header(OP_REQUEST, 5004, 95, dst_cid=1))
    assert [h.op for h, _ in guest.recv()] == [OP_RST, OP_RST]
    assert not guest.driver.status & DEVICE_NEEDS_RESET
    assert device.metrics.extra["packets_dropped"] >= 6
    assert device.links == {}
    server.close()


def test_snapshot_restore_sends_transport_reset(guest, uds):
    server, peer = guest_connect(guest, uds, 96)
    event_buffers = [guest.driver.alloc(4) for _ in range(2)]
    for addr in event_buffers:
        guest.driver.memory.write(addr, b"\xff" * 4)
        guest.events.add([(addr, 4, True)])
    assert guest.events.take_used() == []  # nothing to report while running
    guest.driver.ack_interrupt()
    # what vmm/snapshot.py saves: the transport's state and the device's own
    saved = {**guest.driver.transport.save_state(), "device": guest.device.save_state()}
    assert saved["device"] == {"guest_cid": GUEST_CID}
    # a new process: the same configuration, the guest's memory; the device, then its transport
    restored = VirtioVsock(GUEST_CID, uds + "2")
    try:
        driver = mock_guest(restored, memory=guest.driver.memory)
        host = ManualHost()
        restored.attach_host(host)
        restored.restore_state(saved["device"])
        driver.transport.restore_state(saved)
        host.advance(0)  # the event loop runs once the restore is complete
        used = guest.events.take_used()
        assert len(used) == 1 and used[0][1] == 4
        assert guest.driver.memory.read(event_buffers[0], 4) == struct.pack("<I", 0)  # TRANSPORT_RESET
        assert driver.read_reg(mmio.INTERRUPT_STATUS) & mmio.INTERRUPT_USED_BUFFER
        assert restored.links == {}
        host.advance(1)
        assert guest.events.take_used() == []  # once
    finally:
        restored.close()
        server.close()
        peer.close()


def test_transport_reset_waits_for_an_event_buffer(uds):
    device = VirtioVsock(GUEST_CID, uds)
    g = VsockGuest(device)
    try:
        device.restore_state({"guest_cid": GUEST_CID})
        g.host.advance(0)
        assert g.events.take_used() == []  # no event buffer yet
        addr = g.driver.alloc(4)
        g.events.add([(addr, 4, True)])  # the driver posts a buffer: the event goes out then
        assert g.events.take_used() == [(0, 4)]
        assert g.driver.memory.read(addr, 4) == bytes(4)
    finally:
        device.close()


def test_local_ports_are_unique_per_stream(guest, uds):
    ports = set()
    clients = []
    for guest_port in (60, 61, 62):
        client, request = host_connect(guest, uds, guest_port)
        ports.add(request.src_port)
        clients.append(client)
    assert len(ports) == 3
    for c in clients:
        c.close()


def test_on_a_real_event_loop(uds, loop):
    """The same device attached to an event loop: kicks, host sockets and the listener are served on
    the loop's thread (through the transport's DeviceHost)."""
    from conftest import wait_for

    device = VirtioVsock(GUEST_CID, uds)
    driver = mock_guest(device, 4 << 20)
    driver.transport.attach(loop)
    try:
        driver.setup()
        rx, tx = driver.queues[0], driver.queues[1]
        memory = driver.memory
        slots = {}
        for _ in range(8):
            header, data = driver.alloc(HEADER_SIZE), driver.alloc(4096)
            slots[rx.add([(header, HEADER_SIZE, True), (data, 4096, True)], kick=False)] = (header, data)
        rx.kick()
        received = []

        def packets():
            for head, _length in rx.take_used():
                header, data = slots[head]
                hdr = Header.unpack(memory.read(header, HEADER_SIZE))
                received.append((hdr, memory.read(data, hdr.len)))
            return received

        def send(hdr, payload=b""):
            addr = driver.alloc(HEADER_SIZE + len(payload))
            memory.write(addr, hdr.pack() + payload)
            tx.add([(addr, HEADER_SIZE + len(payload), False)])

        def header(op, length=0):
            return Header(GUEST_CID, HOST_CID, 5000, 77, length, TYPE_STREAM, op, 0, 1 << 18, 0)

        server = listen(f"{uds}_77")
        send(header(OP_REQUEST))
        assert wait_for(lambda: any(h.op == OP_RESPONSE for h, _ in packets()))
        peer, _ = server.accept()
        peer.settimeout(2)
        peer.sendall(b"from the host")
        assert wait_for(lambda: b"".join(p for h, p in packets() if h.op == OP_RW) == b"from the host")
        send(header(OP_RW, 14), b"from the guest")
        assert recv_exactly(peer, 14) == b"from the guest"
        # host-initiated through the listener, on the loop thread too
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(2)
        client.connect(uds)
        client.sendall(b"CONNECT 9\n")
        assert wait_for(lambda: any(h.op == OP_REQUEST and h.dst_port == 9 for h, _ in packets()))
        assert not driver.status & DEVICE_NEEDS_RESET
        for s in (server, peer, client):
            s.close()
    finally:
        driver.transport.close()
    assert not os.path.exists(uds)
