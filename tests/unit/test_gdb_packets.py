"""The gdb remote protocol codec against byte streams: framing, checksums, acks and retransmission,
NoAck mode, escapes, garbage, split reads at every position, Ctrl-C, the size bound; fuzzed."""

from __future__ import annotations

from gdb_fake import gdb_frame, parse_replies
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.gdb.packets import Interrupt, OversizedPacket, Packet, RspCodec, escape, frame, unescape


def drain(codec: RspCodec, data: bytes = b"") -> list:
    codec.receive_data(data)
    events = []
    while (event := codec.next_event()) is not None:
        events.append(event)
    return events


def test_a_packet_is_acknowledged_and_delivered():
    codec = RspCodec()
    assert drain(codec, b"$OK#9a") == [Packet(b"OK")]  # 'O' + 'K' = 0x9a (the manual's example sum)
    assert codec.data_to_send() == b"+"


def test_checksum_is_the_byte_sum_modulo_256():
    payload = bytes(range(0x40, 0x7D)) * 3  # sums past 256
    assert frame(payload)[-2:] == b"%02x" % (sum(payload) % 256)
    codec = RspCodec()
    assert drain(codec, gdb_frame(payload)) == [Packet(payload)]


def test_bad_checksum_is_nacked_and_dropped_and_the_next_packet_is_fine():
    codec = RspCodec()
    good = gdb_frame(b"qC")
    bad = good[:-2] + b"%02x" % ((int(good[-2:], 16) + 1) % 256)
    assert drain(codec, bad + good) == [Packet(b"qC")]
    assert codec.data_to_send() == b"-+"
    assert codec.bad_checksums == 1


def test_a_non_hex_checksum_is_refused_and_a_dollar_there_starts_the_next_packet():
    codec = RspCodec()
    assert drain(codec, b"$g#z" + gdb_frame(b"?")) == [Packet(b"?")]
    assert drain(codec, b"$g#4$?#3f") == [Packet(b"?")]
    assert codec.data_to_send() == b"-+-+"


def test_garbage_between_packets_is_skipped():
    codec = RspCodec()
    stream = b"junk\r\n" + gdb_frame(b"g") + b"\x00\xff#xx" + gdb_frame(b"?") + b"9a"
    assert drain(codec, stream) == [Packet(b"g"), Packet(b"?")]
    assert codec.data_to_send() == b"++"
    assert codec.skipped_bytes == len(b"junk\r\n") + len(b"\x00\xff#xx") + 2


def test_a_dollar_inside_a_packet_restarts_it():
    codec = RspCodec()
    assert drain(codec, b"$m1234,4" + gdb_frame(b"g")) == [Packet(b"g")]


def test_ctrl_c_between_packets_is_an_interrupt_and_inside_x_data_is_data():
    codec = RspCodec()
    x_packet = gdb_frame(b"X10,2:\x03\x04")
    assert drain(codec, b"\x03" + x_packet + b"\x03") == [Interrupt(), Packet(b"X10,2:\x03\x04"), Interrupt()]
    assert codec.data_to_send() == b"+"  # an interrupt is not acknowledged


def test_escapes_are_undone_on_input():
    # gdb escapes # $ } * in X data: '}' then the byte XOR 0x20
    data = b"#$}*\x00ok"
    codec = RspCodec()
    assert drain(codec, gdb_frame(b"X0,7:" + escape(data))) == [Packet(b"X0,7:" + data)]


def test_output_is_escaped_so_gdb_never_sees_run_length_or_framing_bytes():
    codec = RspCodec()
    codec.send(b"l<!-- a # b $ c } d * -->")
    out = codec.data_to_send()
    assert out.count(b"$") == 1 and out.count(b"#") == 1
    assert b"*" not in out
    assert parse_replies(out)[0] == [b"l<!-- a # b $ c } d * -->"]


def test_escape_round_trip_and_a_trailing_escape_is_dropped():
    every_byte = bytes(range(256))
    assert unescape(escape(every_byte)) == every_byte
    assert unescape(b"ab}") == b"ab"


def test_a_nack_retransmits_the_last_reply_until_it_is_acknowledged():
    codec = RspCodec()
    codec.send(b"first")
    codec.send(b"OK")
    codec.data_to_send()
    drain(codec, b"-")
    assert codec.data_to_send() == frame(b"OK")
    drain(codec, b"-")
    assert codec.data_to_send() == frame(b"OK")
    drain(codec, b"+-")
    assert codec.data_to_send() == b""


def test_no_ack_mode():
    codec = RspCodec()
    assert drain(codec, gdb_frame(b"QStartNoAckMode")) == [Packet(b"QStartNoAckMode")]
    codec.send(b"OK")
    codec.stop_acks()
    assert codec.data_to_send() == b"+" + frame(b"OK")  # the switch itself is still acknowledged
    good = gdb_frame(b"g")
    bad = good[:-1] + (b"0" if good[-1:] != b"0" else b"1")
    assert drain(codec, b"+" + good + bad + b"-") == [Packet(b"g")]
    codec.send(b"reply")
    assert codec.data_to_send() == frame(b"reply")  # no '+' for g, no '-' for the bad one, no resend


def test_ack_mode_change_applies_from_the_next_packet_when_two_arrive_together():
    codec = RspCodec()
    codec.receive_data(gdb_frame(b"QStartNoAckMode") + gdb_frame(b"g"))
    assert codec.next_event() == Packet(b"QStartNoAckMode")
    codec.stop_acks()
    assert codec.next_event() == Packet(b"g")
    assert codec.data_to_send() == b"+"


def test_an_oversized_packet_is_reported_not_kept_and_the_next_one_is_served():
    codec = RspCodec(max_packet_size=64)
    big = gdb_frame(b"X0,100:" + b"a" * 0x100)
    assert drain(codec, big + gdb_frame(b"g")) == [OversizedPacket(len(b"X0,100:") + 0x100), Packet(b"g")]
    assert codec.data_to_send() == b"++"
    assert len(codec._payload) <= 64


def test_a_packet_at_the_bound_is_accepted():
    codec = RspCodec(max_packet_size=64)
    assert drain(codec, gdb_frame(b"m" * 64)) == [Packet(b"m" * 64)]


STREAM = (b"+" + gdb_frame(b"qSupported:swbreak+;hwbreak+") + b"\x03" + b"noise" + gdb_frame(b"X40,3:" + escape(b"}#*"))
          + b"$g#00" + gdb_frame(b"vCont;s:1;c") + b"-")  # fmt: skip
EXPECTED = [Packet(b"qSupported:swbreak+;hwbreak+"), Interrupt(), Packet(b"X40,3:}#*"), Packet(b"vCont;s:1;c")]


def run_in_pieces(pieces: list[bytes]) -> tuple[list, bytes]:
    codec = RspCodec()
    codec.send(b"hello")  # so the trailing '-' has something to resend
    events = []
    for piece in pieces:
        events += drain(codec, piece)
    return events, codec.data_to_send()


def test_split_reads_at_every_position_give_the_same_events_and_output():
    whole = run_in_pieces([STREAM])
    assert whole[0] == EXPECTED
    for cut in range(len(STREAM) + 1):
        assert run_in_pieces([STREAM[:cut], STREAM[cut:]]) == whole, cut
    assert run_in_pieces([bytes((b,)) for b in STREAM]) == whole


@given(st.binary(max_size=2000), st.integers(1, 200))
def test_fuzz_any_bytes_never_raise(data, max_size):
    codec = RspCodec(max_packet_size=max_size)
    for event in drain(codec, data):
        assert isinstance(event, (Packet, Interrupt, OversizedPacket))
        if isinstance(event, Packet):
            assert len(event.payload) <= max_size
    assert set(codec.data_to_send()) <= set(b"+-$#0123456789abcdef" + b"hello")


@given(st.lists(st.binary(min_size=0, max_size=100), max_size=8),
       st.lists(st.binary(max_size=20).filter(lambda b: not set(b) & set(b"$+-\x03")), max_size=9),
       st.data())  # fmt: skip
def test_fuzz_packets_between_garbage_come_out_exactly(payloads, noise, data):
    stream = bytearray()
    for i, payload in enumerate(payloads):
        stream += noise[i] if i < len(noise) else b""
        stream += gdb_frame(escape(payload))
    cut = data.draw(st.integers(0, len(stream)))
    codec = RspCodec()
    events = drain(codec, bytes(stream[:cut])) + drain(codec, bytes(stream[cut:]))
    assert events == [Packet(p) for p in payloads]
    assert codec.data_to_send() == b"+" * len(payloads)
