"""One virtio-vsock stream between a guest port and a host Unix socket: its protocol state and
credit, sans-IO.

The device (``device.py``) owns the host socket and the bytes in flight; a
``Connection`` decides what the packets mean and what to send next:

* Credit toward the guest: we never send more than the guest advertised,
  ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` (u32 arithmetic, as the spec
  and Linux compute it; Linux silently drops what overruns its buffer).
* Credit toward us: we advertise ``buf_alloc`` bytes for guest data that is
  not yet written to the host socket, and ``fwd_cnt`` as it drains; a guest
  that sends beyond that credit broke the protocol and is reset. A
  CREDIT_UPDATE goes out once a quarter of the buffer has drained since the
  guest last heard our ``fwd_cnt`` (every packet we send carries it), or at
  once when the guest asks with CREDIT_REQUEST.
* Shutdown: each side's "no more data" is tracked separately (the guest's
  SHUTDOWN flags, the host socket's EOF); when neither side will send and
  the guest's data is flushed, the connection ends with an RST to the guest,
  which is how a Linux peer expects a full close to be confirmed.
"""

from __future__ import annotations

import enum

from pyvmm.devices.virtio.vsock.packet import (
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
    U32,
    Header,
)

#: bytes of guest data we hold for a host socket that has not taken them yet (Linux's default too)
DEFAULT_BUF_ALLOC = 256 << 10


class State(enum.Enum):
    CONNECTING = "connecting"  # host-initiated: REQUEST sent, waiting for the guest's RESPONSE
    ESTABLISHED = "established"
    CLOSED = "closed"


class Reaction(enum.Enum):
    """What a guest packet asks of the device, beyond the packets the connection queues itself."""

    NONE = "none"
    DATA = "data"  # forward the packet's payload to the host socket
    CONNECTED = "connected"  # the guest accepted a host-initiated connection: tell the host process
    CLOSE = "close"  # the stream is over (the guest's RST, or both sides done): close the host socket
    RESET = "reset"  # the guest broke the protocol: close the host socket, an RST is queued for the guest


class Connection:
    def __init__(self, guest_cid: int, local_port: int, peer_port: int, *, host_initiated: bool,
                 buf_alloc: int = DEFAULT_BUF_ALLOC):  # fmt: skip
        self.guest_cid = guest_cid
        self.local_port = local_port  # the host side's port
        self.peer_port = peer_port  # the guest's port
        self.buf_alloc = buf_alloc
        self.state = State.CONNECTING if host_initiated else State.ESTABLISHED
        # credit: what the guest told us, and what we sent / received / forwarded (Python ints; u32 on the wire)
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0  # payload bytes sent to the guest
        self.rx_cnt = 0  # payload bytes received from the guest
        self.fwd_cnt = 0  # of those, bytes written to the host socket
        self.last_fwd_cnt_sent = 0  # the fwd_cnt the guest last heard from us
        # shutdown: what each side said it will no longer do
        self.guest_shutdown = 0  # SHUTDOWN_RCV / SHUTDOWN_SEND from the guest
        self.host_eof = False  # the host socket returned EOF
        self.host_write_shut = False  # we shut the host socket's write side (guest sent SEND)
        # control packets waiting for a receive buffer
        self._want_request = host_initiated
        self._want_response = not host_initiated
        self._want_shutdown = 0
        self._want_credit_update = False
        self._want_rst = False

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    # --- credit --------------------------------------------------------------------------------
    def peer_credit(self) -> int:
        """Payload bytes the guest can take from us now."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)

    def pending_to_host(self) -> int:
        """Guest bytes received and not yet written to the host socket."""
        return self.rx_cnt - self.fwd_cnt

    def forwarded(self, count: int) -> None:
        """``count`` guest bytes went into the host socket."""
        self.fwd_cnt += count
        if self.fwd_cnt - self.last_fwd_cnt_sent >= self.buf_alloc // 4:
            self._want_credit_update = True

    def wants_host_data(self) -> bool:
        """Whether to read the host socket now: connected, more may come, the guest will take it."""
        return (self.state is State.ESTABLISHED and not self.host_eof and not self.guest_shutdown & SHUTDOWN_RCV
                and not self._want_rst and self.peer_credit() > 0)  # fmt: skip

    # --- packets from the guest -------------------------------------------------------------------
    def receive(self, hdr: Header) -> Reaction:
        """Apply a guest packet addressed to this connection (its type, CIDs and ports are checked)."""
        if self.state is State.CLOSED:
            return Reaction.NONE
        self.peer_buf_alloc, self.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        op = hdr.op
        if op == OP_RST:
            self.state = State.CLOSED
            self._want_rst = False  # the guest already forgot the connection
            return Reaction.CLOSE
        if self.state is State.CONNECTING:
            if op == OP_RESPONSE:
                self.state = State.ESTABLISHED
                return Reaction.CONNECTED
            return self.reset()  # anything else before the RESPONSE is a protocol error
        if op == OP_RW:
            if self.guest_shutdown & SHUTDOWN_SEND or self.pending_to_host() + hdr.len > self.buf_alloc:
                return self.reset()  # data after SHUTDOWN(SEND), or beyond the credit we gave
            self.rx_cnt += hdr.len
            return Reaction.DATA
        if op == OP_CREDIT_UPDATE:
            return Reaction.NONE  # the credit fields were taken above
        if op == OP_CREDIT_REQUEST:
            self._want_credit_update = True
            return Reaction.NONE
        if op == OP_SHUTDOWN:
            self.guest_shutdown |= hdr.flags & SHUTDOWN_BOTH
            return Reaction.CLOSE if self.finished() else Reaction.NONE
        return self.reset()  # REQUEST or RESPONSE on an established connection, or an unknown op

    def reset(self) -> Reaction:
        """End the connection with an RST to the guest."""
        self.state = State.CLOSED
        self._want_rst = True
        return Reaction.RESET

    # --- host side events ---------------------------------------------------------------------------
    def host_closed(self) -> None:
        """The host socket returned EOF: tell the guest no more data comes from us."""
        if not self.host_eof:
            self.host_eof = True
            if self.state is State.ESTABLISHED and not self.guest_shutdown & SHUTDOWN_RCV:
                self._want_shutdown |= SHUTDOWN_SEND

    def should_shut_host_write(self) -> bool:
        """The guest will send nothing more and all it sent reached the host socket."""
        return bool(self.guest_shutdown & SHUTDOWN_SEND) and not self.host_write_shut and self.pending_to_host() == 0

    def finished(self) -> bool:
        """Neither side will send again and the guest's data is flushed: the stream ends, and the
        closing RST is queued (``next_control``)."""
        host_done = self.host_eof or self.guest_shutdown & SHUTDOWN_RCV
        done = bool(self.guest_shutdown & SHUTDOWN_SEND) and bool(host_done) and self.pending_to_host() == 0
        if done and self.state is not State.CLOSED:
            self.state = State.CLOSED
            self._want_rst = True
        return done

    # --- packets to the guest -------------------------------------------------------------------------
    def next_control(self) -> Header | None:
        """The next control packet to send (and forget), or None."""
        if self._want_rst:
            self._want_rst = False
            return self._header(OP_RST)
        if self.state is State.CLOSED:
            return None
        if self._want_request:
            self._want_request = False
            return self._header(OP_REQUEST)
        if self._want_response:
            self._want_response = False
            return self._header(OP_RESPONSE)
        if self.state is not State.ESTABLISHED:
            return None
        if self._want_shutdown:
            flags, self._want_shutdown = self._want_shutdown, 0
            return self._header(OP_SHUTDOWN, flags=flags)
        if self._want_credit_update:
            return self._header(OP_CREDIT_UPDATE)
        return None

    def has_control(self) -> bool:
        return self._want_rst or (self.state is not State.CLOSED and (
            self._want_request or self._want_response
            or (self.state is State.ESTABLISHED and (bool(self._want_shutdown) or self._want_credit_update))))  # fmt: skip

    def data_header(self, length: int) -> Header:
        """The RW header for ``length`` payload bytes about to be sent (counts them against the credit)."""
        self.tx_cnt += length
        return self._header(OP_RW, length=length)

    def _header(self, op: int, *, length: int = 0, flags: int = 0) -> Header:
        # Every packet advertises our buffer, so the guest hears about drained bytes with any of them.
        self.last_fwd_cnt_sent = self.fwd_cnt
        self._want_credit_update = False
        return Header(HOST_CID, self.guest_cid, self.local_port, self.peer_port, length, TYPE_STREAM, op, flags,
                      self.buf_alloc, self.fwd_cnt & U32)  # fmt: skip
