"""The vhost-user message codec, sans-IO (QEMU docs/interop/vhost-user.rst, protocol version 1).

A message is a 12-byte little-endian header (u32 request, u32 flags, u32 payload size) and
its payload; file descriptors travel beside it as SCM_RIGHTS ancillary data (the socket's
business, not this module's). ``encode`` builds a message, the ``*_payload`` functions build
each payload the front end sends, and the ``decode_*`` functions read them back (a backend
model in tests, and the replies the front end receives). ``Reader`` splits a byte stream into
messages and refuses what a peer may not send: a wrong version, an oversized payload.
``check_reply`` holds a reply to what was asked (the request it answers, the REPLY flag, the
exact payload size), so a confused backend is a ``ProtocolError``, never a misread value.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from pyvmm.errors import PyvmmError

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
_KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

#: virtio feature bit the backend offers when it speaks GET/SET_PROTOCOL_FEATURES
F_PROTOCOL_FEATURES = 30

#: protocol feature bits (GET_PROTOCOL_FEATURES)
PROTOCOL_F_MQ = 0
PROTOCOL_F_LOG_SHMFD = 1
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_CONFIG = 9

#: SET_VRING_KICK/CALL/ERR payload: the queue index (bits 0-7) and "no fd follows" (bit 8)
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8

#: regions a SET_MEM_TABLE may carry without CONFIGURE_MEM_SLOTS
MAX_MEM_REGIONS = 8
#: the most a front end ever needs to read: the largest payload of the spec's union is well below it
MAX_PAYLOAD = 0x1000

HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_MEM_TABLE_HEAD = struct.Struct("<II")
_MEM_REGION = struct.Struct("<QQQQ")


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18


#: requests that carry a reply of their own, and its payload size
REPLY_SIZES = {
    Request.GET_FEATURES: _U64.size,
    Request.GET_PROTOCOL_FEATURES: _U64.size,
    Request.GET_QUEUE_NUM: _U64.size,
    Request.GET_VRING_BASE: _VRING_STATE.size,
}


class ProtocolError(PyvmmError):
    """A vhost-user message that breaks the protocol (from the backend, or asked of the codec)."""


def request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


@dataclass(frozen=True)
class Message:
    request: int
    flags: int
    payload: bytes

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def needs_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


def encode(request: int, payload: bytes = b"", *, need_reply: bool = False, reply: bool = False) -> bytes:
    """One message: header + payload."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"{request_name(request)}: payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0) | (FLAG_REPLY if reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def decode_header(data: bytes) -> tuple[int, int, int]:
    """(request, flags, size) of a 12-byte header; a wrong version, unknown flag or oversized payload is refused."""
    if len(data) != HEADER.size:
        raise ProtocolError(f"vhost-user header of {len(data)} bytes (expected {HEADER.size})")
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise ProtocolError(f"{request_name(request)}: protocol version {flags & VERSION_MASK} (this front end speaks {VERSION})")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"{request_name(request)}: unknown header flags {flags & ~_KNOWN_FLAGS:#x}")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"{request_name(request)}: payload size {size} exceeds {MAX_PAYLOAD}")
    return request, flags, size


class Reader:
    """Incremental decoder of a byte stream into ``Message``s (``feed`` returns the complete ones)."""

    def __init__(self):
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= HEADER.size:
            request, flags, size = decode_header(bytes(self._buffer[: HEADER.size]))
            end = HEADER.size + size
            if len(self._buffer) < end:
                break
            messages.append(Message(request, flags, bytes(self._buffer[HEADER.size : end])))
            del self._buffer[:end]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of a message not yet complete."""
        return len(self._buffer)


def check_reply(request: int, flags: int, size: int, *, expected_size: int) -> None:
    """A reply header must answer ``request``, carry the REPLY flag and the payload size the request has."""
    name = request_name(request)
    if not flags & FLAG_REPLY:
        raise ProtocolError(f"{name}: the backend sent a message without the REPLY flag where a reply was due")
    if size != expected_size:
        raise ProtocolError(f"{name}: reply payload of {size} bytes (expected {expected_size})")


# --- payloads ----------------------------------------------------------------
def u64_payload(value: int) -> bytes:
    if not 0 <= value < 1 << 64:
        raise ProtocolError(f"{value} does not fit a u64 payload")
    return _U64.pack(value)


def decode_u64(payload: bytes) -> int:
    _need(payload, _U64.size, "u64")
    return _U64.unpack(payload)[0]


def vring_state_payload(index: int, num: int) -> bytes:
    if not (0 <= index < 1 << 32 and 0 <= num < 1 << 32):
        raise ProtocolError(f"vring state ({index}, {num}) does not fit two u32")
    return _VRING_STATE.pack(index, num)


def decode_vring_state(payload: bytes) -> tuple[int, int]:
    """(index, num)."""
    _need(payload, _VRING_STATE.size, "vring state")
    return _VRING_STATE.unpack(payload)


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int  # user (front-end virtual) addresses
    used: int
    avail: int
    log: int = 0


def vring_addr_payload(addr: VringAddr) -> bytes:
    try:
        return _VRING_ADDR.pack(addr.index, addr.flags, addr.desc, addr.used, addr.avail, addr.log)
    except struct.error as err:
        raise ProtocolError(f"vring address {addr} does not fit its fields: {err}") from err


def decode_vring_addr(payload: bytes) -> VringAddr:
    _need(payload, _VRING_ADDR.size, "vring address")
    return VringAddr(*_VRING_ADDR.unpack(payload))


def vring_fd_payload(index: int, has_fd: bool) -> bytes:
    """SET_VRING_KICK/CALL/ERR: the queue index, and bit 8 when no fd is attached."""
    if not 0 <= index <= VRING_INDEX_MASK:
        raise ProtocolError(f"queue index {index} does not fit the 8-bit vring index")
    return _U64.pack(index | (0 if has_fd else VRING_NOFD))


def decode_vring_fd(payload: bytes) -> tuple[int, bool]:
    """(index, has_fd)."""
    value = decode_u64(payload)
    if value & ~(VRING_INDEX_MASK | VRING_NOFD):
        raise ProtocolError(f"vring fd payload {value:#x} has bits beyond the index and the no-fd flag")
    return value & VRING_INDEX_MASK, not value & VRING_NOFD


@dataclass(frozen=True)
class MemRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int  # where the front end maps it
    mmap_offset: int  # offset of the region in the fd sent beside it


def mem_table_payload(regions: list[MemRegion]) -> bytes:
    if not 1 <= len(regions) <= MAX_MEM_REGIONS:
        raise ProtocolError(f"a memory table of {len(regions)} regions (1..{MAX_MEM_REGIONS} allowed)")
    try:
        body = b"".join(_MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
                        for r in regions)  # fmt: skip
    except struct.error as err:
        raise ProtocolError(f"a memory region does not fit its u64 fields: {err}") from err
    return _MEM_TABLE_HEAD.pack(len(regions), 0) + body


def decode_mem_table(payload: bytes) -> list[MemRegion]:
    if len(payload) < _MEM_TABLE_HEAD.size:
        raise ProtocolError(f"memory table of {len(payload)} bytes is shorter than its header")
    count, _padding = _MEM_TABLE_HEAD.unpack_from(payload)
    if not 1 <= count <= MAX_MEM_REGIONS:
        raise ProtocolError(f"memory table of {count} regions (1..{MAX_MEM_REGIONS} allowed)")
    _need(payload, _MEM_TABLE_HEAD.size + count * _MEM_REGION.size, "memory table")
    return [MemRegion(*_MEM_REGION.unpack_from(payload, _MEM_TABLE_HEAD.size + i * _MEM_REGION.size)) for i in range(count)]


def _need(payload: bytes, size: int, what: str) -> None:
    if len(payload) != size:
        raise ProtocolError(f"{what} payload of {len(payload)} bytes (expected {size})")
