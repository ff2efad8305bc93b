"""virtio-vsock packets (virtio 1.2, section 5.10.6), sans-IO.

Every packet starts with a 44-byte little-endian header::

    le64 src_cid; le64 dst_cid; le32 src_port; le32 dst_port; le32 len;
    le16 type; le16 op; le32 flags; le32 buf_alloc; le32 fwd_cnt;

followed by ``len`` payload bytes (RW packets only). A driver may split a
packet over several descriptors anywhere, even inside the header (Linux 6.1
puts the header and the payload in two), so the helpers here read and write
across a chain's list of buffers.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size  # 44

HOST_CID = 2  # VMADDR_CID_HOST: the host side of every guest connection

TYPE_STREAM = 1
TYPE_SEQPACKET = 2

OP_INVALID = 0
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
OP_NAMES = {OP_INVALID: "INVALID", OP_REQUEST: "REQUEST", OP_RESPONSE: "RESPONSE", OP_RST: "RST",
            OP_SHUTDOWN: "SHUTDOWN", OP_RW: "RW", OP_CREDIT_UPDATE: "CREDIT_UPDATE",
            OP_CREDIT_REQUEST: "CREDIT_REQUEST"}  # fmt: skip

#: SHUTDOWN flags: the sender will receive / send no more data
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

#: the one event the device sends on the event queue (struct virtio_vsock_event { le32 id; })
EVENT_TRANSPORT_RESET = 0
EVENT_SIZE = 4

U32 = 0xFFFFFFFF


class Header(NamedTuple):
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return HEADER.pack(*self)

    @classmethod
    def unpack(cls, data) -> Header:
        return cls._make(HEADER.unpack_from(data))

    def describe(self) -> str:
        op = OP_NAMES.get(self.op, f"op {self.op}")
        return f"{op} {self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port} len {self.len}"


def gather(views: list[memoryview], start: int, length: int) -> bytes:
    """``length`` bytes from offset ``start`` of the concatenated ``views`` (fewer if they end first)."""
    return b"".join(bytes(v) for v in slice_views(views, start, length))


def slice_views(views: list[memoryview], start: int, length: int) -> list[memoryview]:
    """The pieces of ``views`` covering ``[start, start + length)`` of their concatenation (no copy)."""
    out = []
    for view in views:
        size = len(view)
        if start >= size:
            start -= size
            continue
        piece = view[start : start + length]
        out.append(piece)
        length -= len(piece)
        start = 0
        if length <= 0:
            break
    return out


def scatter(views: list[memoryview], data: bytes) -> int:
    """Copy ``data`` into the start of the concatenated ``views``; the bytes written."""
    offset = 0
    for view in views:
        if offset >= len(data):
            break
        size = min(len(view), len(data) - offset)
        view[:size] = data[offset : offset + size]
        offset += size
    return offset
