"""virtio-vsock: whatever the guest puts on the transmit queue (random headers, lengths, chain
shapes, ops, ports, CIDs) never raises out of the device, never marks it DEVICE_NEEDS_RESET, and
never makes it exceed its own buffer or the guest's credit."""

from __future__ import annotations

import socket
import tempfile

import pytest

if not hasattr(socket, "AF_UNIX"):
    pytest.skip("virtio-vsock bridges to Unix sockets", allow_module_level=True)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from vsock_guest import GUEST_CID, VsockGuest  # noqa: E402

from pyvmm.devices.virtio.status import DEVICE_NEEDS_RESET  # noqa: E402
from pyvmm.devices.virtio.vsock.device import VirtioVsock  # noqa: E402
from pyvmm.devices.virtio.vsock.packet import HEADER_SIZE, OP_REQUEST, OP_RW, Header  # noqa: E402

LISTENED_PORT = 700

u32 = st.integers(0, 0xFFFFFFFF)
headers = st.builds(
    Header,
    # mostly well addressed, so that streams open and the ops reach them
    src_cid=st.sampled_from([GUEST_CID] * 6 + [2, 0, 1 << 40, 0xFFFFFFFFFFFFFFFF]),
    dst_cid=st.sampled_from([2] * 6 + [1, GUEST_CID, 0xFFFFFFFF]),
    src_port=st.sampled_from([1000] * 4 + [1001, 0, 0xFFFFFFFF]),
    dst_port=st.sampled_from([LISTENED_PORT] * 4 + [701, 1 << 30, 0]),
    len=st.one_of(st.integers(0, 64), st.integers(0, 2048), st.sampled_from([4096, 65536, 1 << 20, 0xFFFFFFFF])),
    type=st.sampled_from([1] * 6 + [2, 0, 0xFFFF]),
    op=st.integers(0, 9),
    flags=st.sampled_from([0, 1, 2, 3, 0xFFFFFFFF]),
    buf_alloc=st.sampled_from([0, 4096, 256 << 10, 0xFFFFFFFF]),
    fwd_cnt=u32,
)

#: packets on the stream ``open_first`` opens: the ops, lengths and credit fields are what varies
stream_headers = st.builds(
    Header, src_cid=st.just(GUEST_CID), dst_cid=st.just(2), src_port=st.just(1000), dst_port=st.just(LISTENED_PORT),
    len=st.one_of(st.integers(0, 300), st.integers(0, 2048)), type=st.just(1),
    op=st.sampled_from([OP_RW] * 6 + list(range(10))),
    flags=st.sampled_from([0, 1, 2, 3, 0xFFFFFFFF]), buf_alloc=st.sampled_from([0, 4096, 256 << 10, 0xFFFFFFFF]),
    fwd_cnt=u32,
)


@st.composite
def packets(draw):
    """A header (perhaps cut short) and a payload, split over 1-4 buffers at random places."""
    hdr = draw(stream_headers if draw(st.sampled_from([True, True, False])) else headers)
    raw = hdr.pack()
    if draw(st.sampled_from([False] * 9 + [True])):  # (sampled_from draws near-uniformly; integers favour 0)
        raw = raw[: draw(st.integers(0, HEADER_SIZE - 1))]
    payload_len = min(hdr.len, 2048) if draw(st.sampled_from([True, True, False])) else draw(st.integers(0, 300))
    data = raw + bytes(draw(st.binary(min_size=payload_len, max_size=payload_len)))
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=3, unique=True)))
    if not data:
        return [b"\0"]
    pieces, last = [], 0
    for cut in cuts + [len(data)]:
        if cut > last:
            pieces.append(data[last:cut])
            last = cut
    return pieces


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(packets(), min_size=1, max_size=12), st.integers(0, 3), st.sampled_from([True, True, False]))
def test_random_transmit_packets_never_break_the_device(batch, starve, open_first):
    with tempfile.TemporaryDirectory() as folder:
        uds = f"{folder}/v.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(f"{uds}_{LISTENED_PORT}")
        server.listen(16)
        server.setblocking(False)
        device = VirtioVsock(GUEST_CID, uds, buf_alloc=1024)
        guest = VsockGuest(device, rx_buffers=starve * 2)
        accepted = []
        if open_first:  # a stream the random packets can hit
            request = Header(GUEST_CID, 2, 1000, LISTENED_PORT, 0, 1, OP_REQUEST, 0, 4096, 0)
            batch = [[request.pack()]] + batch
        opened = 0
        try:
            for pieces in batch:
                guest.send_raw(pieces)
                try:
                    peer = server.accept()[0]
                    accepted.append(peer)
                    peer.sendall(bytes(range(256)) * 12)  # host data for the guest, under random credit
                except BlockingIOError:
                    pass
                guest.pump()
                for hdr, payload in guest.recv():
                    assert hdr.dst_cid == GUEST_CID and hdr.src_cid == 2
                    if hdr.op == OP_RW:
                        assert len(payload) == hdr.len
                assert not guest.driver.status & DEVICE_NEEDS_RESET, guest.driver.transport.last_error
                opened = max(opened, len(device.links))
                for link in device.links.values():
                    assert link.conn.pending_to_host() <= 1024
                    assert link.conn.peer_credit() <= link.conn.peer_buf_alloc
            guest.driver.set_status(0)  # and a reset afterwards ends whatever was opened
            assert device.links == {}
            assert opened or not open_first
        finally:
            device.close()
            server.close()
            for sock in accepted:
                sock.close()
