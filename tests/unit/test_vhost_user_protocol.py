"""The vhost-user codec (devices/vhost_user/protocol.py): every message both ways, and what it refuses."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.devices.vhost_user import protocol as vu
from pyvmm.devices.vhost_user.protocol import MemRegion, ProtocolError, Request, VringAddr


def roundtrip(request, payload=b"", **flags) -> vu.Message:
    data = vu.encode(request, payload, **flags)
    messages = vu.Reader().feed(data)
    assert len(messages) == 1
    return messages[0]


def test_header_layout_is_the_spec():
    data = vu.encode(Request.SET_VRING_NUM, vu.vring_state_payload(1, 256), need_reply=True)
    assert data[:12] == struct.pack("<III", 8, 0x1 | 0x8, 8)
    assert data[12:] == struct.pack("<II", 1, 256)
    assert vu.encode(Request.GET_FEATURES, vu.u64_payload(5), reply=True)[:12] == struct.pack("<III", 1, 0x5, 8)


def test_requests_without_payload():
    for request in (Request.GET_FEATURES, Request.SET_OWNER, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM):
        message = roundtrip(request)
        assert (message.request, message.payload, message.is_reply, message.needs_reply) == (request, b"", False, False)


@pytest.mark.parametrize("request_", [Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES])
def test_u64_requests_and_replies(request_):
    value = 1 << 32 | 1 << 30 | 1 << 29
    assert vu.decode_u64(roundtrip(request_, vu.u64_payload(value)).payload) == value
    reply = roundtrip(request_, vu.u64_payload(value), reply=True)
    vu.check_reply(reply.request, reply.flags, len(reply.payload), expected_size=8)
    assert vu.decode_u64(reply.payload) == value


@pytest.mark.parametrize("request_", [Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE,
                                      Request.SET_VRING_ENABLE])  # fmt: skip
def test_vring_state_both_ways(request_):
    assert vu.decode_vring_state(roundtrip(request_, vu.vring_state_payload(3, 0xFFFF)).payload) == (3, 0xFFFF)
    reply = roundtrip(request_, vu.vring_state_payload(3, 17), reply=True)
    assert reply.is_reply and vu.decode_vring_state(reply.payload) == (3, 17)


def test_vring_addr_both_ways():
    addr = VringAddr(1, 0, desc=0x7F0000001000, used=0x7F0000003000, avail=0x7F0000002000, log=0)
    payload = vu.vring_addr_payload(addr)
    assert len(payload) == 40 and payload[:8] == struct.pack("<II", 1, 0)
    assert vu.decode_vring_addr(roundtrip(Request.SET_VRING_ADDR, payload).payload) == addr


@pytest.mark.parametrize("request_", [Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR])
def test_vring_fd_both_ways(request_):
    assert vu.decode_vring_fd(roundtrip(request_, vu.vring_fd_payload(2, True)).payload) == (2, True)
    assert vu.decode_u64(vu.vring_fd_payload(2, False)) == 2 | 0x100  # bit 8: no fd, poll
    assert vu.decode_vring_fd(vu.vring_fd_payload(2, False)) == (2, False)


def test_mem_table_both_ways():
    regions = [MemRegion(0, 3 << 30, 0x7F0000000000, 0), MemRegion(4 << 30, 1 << 30, 0x7F00C0000000, 3 << 30)]
    payload = vu.mem_table_payload(regions)
    assert len(payload) == 8 + 2 * 32 and payload[:8] == struct.pack("<II", 2, 0)
    assert vu.decode_mem_table(roundtrip(Request.SET_MEM_TABLE, payload).payload) == regions


def test_reader_splits_a_stream_fed_byte_by_byte():
    stream = (vu.encode(Request.GET_FEATURES, vu.u64_payload(7), reply=True)
              + vu.encode(Request.GET_VRING_BASE, vu.vring_state_payload(1, 5), reply=True)
              + vu.encode(Request.SET_OWNER))  # fmt: skip
    reader, messages = vu.Reader(), []
    for byte in stream:
        messages += reader.feed(bytes([byte]))
    assert [m.request for m in messages] == [Request.GET_FEATURES, Request.GET_VRING_BASE, Request.SET_OWNER]
    assert reader.pending == 0


@pytest.mark.parametrize("flags, problem", [(0x0, "version 0"), (0x2, "version 2"), (0x3, "version 3"),
                                            (0x1 | 0x10, "unknown header flags")])  # fmt: skip
def test_bad_headers_are_refused(flags, problem):
    with pytest.raises(ProtocolError, match=problem):
        vu.decode_header(struct.pack("<III", 1, flags, 8))


def test_oversized_payload_is_refused_before_reading_it():
    with pytest.raises(ProtocolError, match="exceeds"):
        vu.Reader().feed(struct.pack("<III", 1, 0x5, 1 << 31))
    with pytest.raises(ProtocolError, match="exceeds"):
        vu.encode(Request.SET_MEM_TABLE, bytes(vu.MAX_PAYLOAD + 1))


def test_check_reply():
    vu.check_reply(Request.GET_FEATURES, 0x5, 8, expected_size=8)
    with pytest.raises(ProtocolError, match="without the REPLY flag"):
        vu.check_reply(Request.GET_FEATURES, 0x1, 8, expected_size=8)
    with pytest.raises(ProtocolError, match="reply payload of 4 bytes"):
        vu.check_reply(Request.GET_FEATURES, 0x5, 4, expected_size=8)


def test_payload_decoders_refuse_wrong_sizes():
    with pytest.raises(ProtocolError):
        vu.decode_u64(bytes(7))
    with pytest.raises(ProtocolError):
        vu.decode_vring_state(bytes(12))
    with pytest.raises(ProtocolError):
        vu.decode_vring_addr(bytes(39))
    with pytest.raises(ProtocolError, match="0 regions"):
        vu.decode_mem_table(struct.pack("<II", 0, 0))
    with pytest.raises(ProtocolError, match="9 regions"):
        vu.decode_mem_table(struct.pack("<II", 9, 0) + bytes(9 * 32))
    with pytest.raises(ProtocolError):
        vu.decode_mem_table(struct.pack("<II", 2, 0) + bytes(32))  # one region short
    with pytest.raises(ProtocolError, match="beyond"):
        vu.decode_vring_fd(vu.u64_payload(0x200))


def test_payload_encoders_refuse_what_does_not_fit():
    with pytest.raises(ProtocolError):
        vu.u64_payload(1 << 64)
    with pytest.raises(ProtocolError):
        vu.vring_fd_payload(256, True)
    with pytest.raises(ProtocolError):
        vu.mem_table_payload([])
    with pytest.raises(ProtocolError):
        vu.mem_table_payload([MemRegion(0, 4096, 0, 0)] * 9)
    with pytest.raises(ProtocolError):
        vu.vring_addr_payload(VringAddr(1 << 32, 0, 0, 0, 0))


@given(st.binary(max_size=256), st.integers(1, 64))
def test_reader_on_arbitrary_bytes_returns_messages_or_refuses(data, chunk):
    reader = vu.Reader()
    try:
        for start in range(0, len(data), chunk):
            for message in reader.feed(data[start : start + chunk]):
                assert message.flags & vu.VERSION_MASK == vu.VERSION and len(message.payload) <= vu.MAX_PAYLOAD
    except ProtocolError as err:
        assert "\n" not in str(err)


@given(st.binary(max_size=400))
def test_payload_decoders_on_arbitrary_bytes(data):
    for decode in (vu.decode_u64, vu.decode_vring_state, vu.decode_vring_addr, vu.decode_vring_fd, vu.decode_mem_table):
        try:
            decode(data)
        except ProtocolError:
            pass


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
                          st.integers(0, 2**64 - 1)), min_size=1, max_size=8))  # fmt: skip
def test_mem_table_roundtrip_property(rows):
    regions = [MemRegion(*row) for row in rows]
    assert vu.decode_mem_table(vu.mem_table_payload(regions)) == regions
