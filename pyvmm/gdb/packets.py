"""The gdb remote serial protocol's framing, sans-IO (gdb manual, "Remote Protocol": Overview,
Packet Acknowledgment, Interrupts).

A packet is ``$payload#xx``: ``xx`` is the sum of the payload bytes as sent, modulo 256, in two hex
digits. ``}`` escapes the next byte (sent XOR 0x20); gdb escapes ``#``, ``$``, ``}`` and ``*`` in
binary data (the X packet), and so does this codec in everything it sends, because gdb reads a raw
``*`` in a reply as run-length encoding. Until ``QStartNoAckMode`` each packet is acknowledged with
``+`` (received intact) or ``-`` (bad checksum: send it again). A lone 0x03 between packets is gdb's
Ctrl-C. Anything else between packets is noise and skipped.

``RspCodec`` is used h11-style: ``receive_data(bytes)``, then ``next_event()`` until it returns None
(so an ack-mode change made while handling one packet applies to the next), ``send(payload)`` for
each reply, and ``data_to_send()`` for the bytes that must go to gdb.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the largest payload (as sent, escapes included) this stub takes; gdb is told so in qSupported
PACKET_SIZE = 0x4000

INTERRUPT_BYTE = 0x03
ESCAPE = 0x7D  # '}'
ESCAPED = frozenset(b"#$}*")


@dataclass(frozen=True)
class Packet:
    """A packet received intact (checksum good), its escapes undone."""

    payload: bytes


@dataclass(frozen=True)
class Interrupt:
    """gdb's Ctrl-C: stop the target."""


@dataclass(frozen=True)
class OversizedPacket:
    """A packet received intact but longer than the codec's bound; its payload was dropped."""

    size: int


Event = Packet | Interrupt | OversizedPacket


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    out = bytearray()
    for byte in data:
        if byte in ESCAPED:
            out += bytes((ESCAPE, byte ^ 0x20))
        else:
            out.append(byte)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """``data`` with ``}`` escapes undone; a ``}`` at the very end has nothing to escape and is dropped."""
    if ESCAPE not in data:
        return data
    out = bytearray()
    pending = False
    for byte in data:
        if pending:
            out.append(byte ^ 0x20)
            pending = False
        elif byte == ESCAPE:
            pending = True
        else:
            out.append(byte)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """``payload`` as a packet on the wire: escaped, with its checksum."""
    body = escape(payload)
    return b"$" + body + b"#" + b"%02x" % checksum(body)


_HEX = frozenset(b"0123456789abcdefABCDEF")

# receiver states
_IDLE, _DATA, _CHECKSUM = range(3)


class RspCodec:
    """One side of a gdb connection's framing: the stub's (it acknowledges gdb's packets)."""

    def __init__(self, max_packet_size: int = PACKET_SIZE):
        self.max_packet_size = max_packet_size
        self.ack_mode = True
        self._input = bytearray()
        self._output = bytearray()
        #: the last packet sent, kept until gdb acknowledges it (ack mode only)
        self._unacknowledged: bytes | None = None
        self._state = _IDLE
        self._payload = bytearray()
        self._size = 0  # bytes of the current payload, kept or not
        self._sum = 0
        self._checksum_digits = bytearray()
        #: counters a session may log: packets refused for their checksum, noise bytes skipped
        self.bad_checksums = 0
        self.skipped_bytes = 0

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> None:
        self._input += data

    def next_event(self) -> Event | None:
        """The next complete event in what was received, or None until more data arrives."""
        position = 0
        try:
            while position < len(self._input):
                byte = self._input[position]
                position += 1
                event = self._step(byte)
                if event is not None:
                    return event
            return None
        finally:
            del self._input[:position]

    def _step(self, byte: int) -> Event | None:
        if self._state == _IDLE:
            if byte == ord("$"):
                self._start_packet()
            elif byte == ord("+"):
                self._unacknowledged = None
            elif byte == ord("-"):
                if self.ack_mode and self._unacknowledged is not None:
                    self._output += self._unacknowledged
            elif byte == INTERRUPT_BYTE:
                return Interrupt()
            else:
                self.skipped_bytes += 1
            return None
        if self._state == _DATA:
            if byte == ord("#"):
                self._state = _CHECKSUM
                self._checksum_digits.clear()
            elif byte == ord("$"):
                # a packet cut short by a new one (a '$' inside a packet is always escaped)
                self.skipped_bytes += self._size + 1
                self._start_packet()
            else:
                self._size += 1
                self._sum += byte
                if self._size <= self.max_packet_size:
                    self._payload.append(byte)
            return None
        # _CHECKSUM
        if byte not in _HEX:
            self._refuse()
            self._state = _IDLE
            return self._step(byte)  # that byte may begin the next packet
        self._checksum_digits.append(byte)
        if len(self._checksum_digits) < 2:
            return None
        self._state = _IDLE
        if int(self._checksum_digits, 16) != self._sum & 0xFF:
            self._refuse()
            return None
        if self.ack_mode:
            self._output += b"+"
        if self._size > self.max_packet_size:
            return OversizedPacket(self._size)
        return Packet(unescape(bytes(self._payload)))

    def _start_packet(self) -> None:
        self._state = _DATA
        self._payload.clear()
        self._size = 0
        self._sum = 0

    def _refuse(self) -> None:
        self.bad_checksums += 1
        if self.ack_mode:
            self._output += b"-"

    # ----------------------------------------------------------------- output

    def send(self, payload: bytes) -> None:
        """Queue ``payload`` as one packet to gdb (escaped and checksummed here)."""
        packet = frame(payload)
        self._output += packet
        if self.ack_mode:
            self._unacknowledged = packet

    def stop_acks(self) -> None:
        """No ``+``/``-`` from here on, either way (after the reply to ``QStartNoAckMode`` is queued)."""
        self.ack_mode = False
        self._unacknowledged = None

    def data_to_send(self) -> bytes:
        out = bytes(self._output)
        self._output.clear()
        return out
