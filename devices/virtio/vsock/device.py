"""The virtio-vsock device (virtio 1.2, section 5.10) with Firecracker's host side.

Guest AF_VSOCK streams are bridged to host AF_UNIX streams, as Firecracker
does (its docs/vsock.md), so Firecracker tooling works unchanged:

* host -> guest: the device listens on ``uds_path``; a host process connects,
  writes ``CONNECT <port>\\n`` and, once the guest's listener on ``port``
  accepts, reads ``OK <host_port>\\n`` (the host-side port we assigned) and
  then the stream. A guest that refuses (RST) or does not answer within
  ``connect_timeout`` gets the host socket closed.
* guest -> host: a guest connecting to CID 2 port ``P`` is bridged to the Unix
  socket ``<uds_path>_<P>``; when nobody listens there the guest gets an RST.

Queues: rx (0, device -> guest packets), tx (1, guest -> device), event (2,
TRANSPORT_RESET after a snapshot restore). Config space: le64 guest_cid.

All host I/O runs on the event-loop thread (``self.host``; queue handlers run
there too), on non-blocking sockets. Buffering is bounded by credit: per
connection at most ``buf_alloc`` guest bytes wait for a slow host socket (the
guest may not send more), and a host socket is read only while the guest has
credit and receive buffers, so a slow guest leaves data in the host socket.
Guest mistakes (a wrong source CID, an unknown op, a length beyond the
descriptors, data beyond our credit) cost the guest an RST or the packet,
with a rate-limited log line, never the VMM.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from collections import deque
from dataclasses import dataclass, field

from pyvmm.devices.guestlog import GuestLog
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.vsock.connection import DEFAULT_BUF_ALLOC, Connection, Reaction, State
from pyvmm.devices.virtio.vsock.packet import (
    EVENT_SIZE,
    EVENT_TRANSPORT_RESET,
    HEADER_SIZE,
    HOST_CID,
    OP_REQUEST,
    OP_RST,
    TYPE_STREAM,
    Header,
    gather,
    scatter,
    slice_views,
)
from pyvmm.errors import DeviceError
from pyvmm.host.poll import READABLE, WRITABLE

log = logging.getLogger("pyvmm.virtio.vsock")

DEVICE_ID_VSOCK = 19
RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2

#: a guest CID is at least 3 (0-2 are reserved) and below VMADDR_CID_ANY (2^32 - 1)
MIN_GUEST_CID = 3
MAX_GUEST_CID = 0xFFFFFFFE
#: sockaddr_un's sun_path holds 108 bytes with the terminating NUL
UNIX_PATH_MAX = 107
#: the most payload one RW packet to the guest carries (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
MAX_PACKET_PAYLOAD = 64 << 10
#: open streams at most; a guest REQUEST beyond that is answered with an RST
MAX_CONNECTIONS = 1024
#: host sockets accepted on uds_path that have not sent their CONNECT line yet
MAX_PENDING_ACCEPTS = 64
MAX_CONNECT_LINE = 32  # "CONNECT 4294967295\n" is 19 bytes
#: RSTs for streams that no longer exist, waiting for receive buffers (more are dropped)
MAX_QUEUED_RSTS = 1024
#: how long the guest has to answer a host-initiated REQUEST
CONNECT_TIMEOUT = 10.0
#: host-initiated streams get host-side ports from here up (Firecracker's choice too)
FIRST_LOCAL_PORT = 1 << 30


def check_guest_cid(cid) -> int:
    if not isinstance(cid, int) or isinstance(cid, bool) or not MIN_GUEST_CID <= cid <= MAX_GUEST_CID:
        raise DeviceError(f"virtio-vsock: guest CID {cid!r} is not an integer in [{MIN_GUEST_CID}, {MAX_GUEST_CID}]")
    return cid


@dataclass
class _Link:
    """A connection and its host socket."""

    conn: Connection
    sock: socket.socket
    #: guest bytes the host socket has not taken yet (at most conn.buf_alloc, by credit)
    out: bytearray = field(default_factory=bytearray)
    #: how many bytes at the start of ``out`` are our own (the OK line), not the guest's
    preamble: int = 0
    events: int = 0  # what the fd is watched for now (0: not watched)
    timer: object = None  # the connect timeout of a host-initiated stream

    @property
    def fd(self) -> int:
        return self.sock.fileno()


class VirtioVsock(VirtioDevice):
    device_id = DEVICE_ID_VSOCK
    name = "virtio-vsock"
    queue_sizes = (256, 256, 16)

    def __init__(self, guest_cid: int, uds_path: str | os.PathLike, *, buf_alloc: int = DEFAULT_BUF_ALLOC,
                 connect_timeout: float = CONNECT_TIMEOUT):  # fmt: skip
        super().__init__()
        self.guest_cid = check_guest_cid(guest_cid)
        self.uds_path = os.fspath(uds_path)
        self.buf_alloc = buf_alloc
        self.connect_timeout = connect_timeout
        self.guest_log = GuestLog(log, self.name)
        self.links: dict[tuple[int, int], _Link] = {}
        self._accepting: dict[int, tuple[socket.socket, bytearray]] = {}  # fd -> (socket, bytes read so far)
        self._ready: deque[tuple[int, int]] = deque()  # links that may have a packet for the guest, round-robin
        self._scheduled: set[tuple[int, int]] = set()
        self._rsts: deque[Header] = deque()  # RSTs of ended streams, waiting for receive buffers
        self._rx_starved = False  # the guest had no receive buffer for a packet we had
        self._reset_event_pending = False  # a snapshot was restored: TRANSPORT_RESET is due
        self._reset_event_held = False  # ... but not before the transport's restore is complete
        self._next_port = FIRST_LOCAL_PORT
        self.metrics.extra.update(connections_opened=0, connections_closed=0, connections_reset=0,
                                  packets_to_guest=0, packets_from_guest=0, bytes_to_guest=0, bytes_from_guest=0,
                                  packets_dropped=0)  # fmt: skip
        self.listener = _listen(self.uds_path)

    # --- virtio --------------------------------------------------------------------------------
    def config_space(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    def attach_host(self, host) -> None:
        super().attach_host(host)
        host.watch(self.listener.fileno(), READABLE, self._on_listener)

    def reset(self) -> None:
        """The driver reset the device (or unloaded): every stream ends; host sockets see EOF."""
        for link in list(self.links.values()):
            self._end(link, reset=True)
        self._ready.clear()
        self._scheduled.clear()
        self._rsts.clear()
        self._rx_starved = False
        self._reset_event_pending = self._reset_event_held = False
        super().reset()

    def process_queue(self, index: int) -> None:
        if index == TX_QUEUE:
            self.drain(TX_QUEUE, self._transmit)
            self._fill_rx()
        elif index == RX_QUEUE:
            self._unstarve()
            self._fill_rx()
        elif index == EVENT_QUEUE:
            self._send_reset_event()

    def close(self) -> None:
        for link in list(self.links.values()):
            self._end(link, reset=True)
        for fd, (sock, _) in list(self._accepting.items()):
            self._drop_accepting(fd, sock)
        if self.host is not None:
            self.host.unwatch(self.listener.fileno())
        self.listener.close()
        try:
            os.unlink(self.uds_path)
        except OSError:
            pass
        self.guest_log.flush()

    # --- snapshots -------------------------------------------------------------------------------
    def save_state(self) -> dict:
        """Open streams are not saved: as Firecracker does, a restored guest is told they are gone."""
        return {"guest_cid": self.guest_cid}

    def restore_state(self, state: dict) -> None:
        """After the transport's restore: tell the driver every connection it had is gone
        (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET; the guest resets its sockets and re-reads its CID)."""
        if state.get("guest_cid", self.guest_cid) != self.guest_cid:
            log.info("%s: the snapshot's guest CID %s is now %d", self.name, state["guest_cid"], self.guest_cid)
        self._reset_event_pending = True
        if self.host is None:
            self._send_reset_event()
            return
        # vmm/snapshot.py restores the device before its transport, and the transport sets the saved
        # interrupt status last: the event (and its interrupt) go out on the event loop after that.
        self._reset_event_held = True
        self.host.call_later(0, self._release_reset_event)

    def _release_reset_event(self) -> None:
        self._reset_event_held = False
        if self.context is None:  # the driver was not running at the snapshot: nothing to tell it
            self._reset_event_pending = False
        self._send_reset_event()

    def _send_reset_event(self) -> None:
        context = self.context
        if not self._reset_event_pending or self._reset_event_held or context is None or not context.queues[EVENT_QUEUE].ready:
            return
        queue, memory = context.queues[EVENT_QUEUE], context.memory
        chain = queue.pop(memory)
        if chain is None:
            return  # delivered when the driver posts an event buffer
        if chain.writable_len < EVENT_SIZE:
            self._guest_mistake("small event buffer", "event buffer of %d bytes is below %d", chain.writable_len, EVENT_SIZE)
            queue.add_used(memory, chain.head, 0)
        else:
            scatter(chain.writable, struct.pack("<I", EVENT_TRANSPORT_RESET))
            queue.add_used(memory, chain.head, EVENT_SIZE)
            self._reset_event_pending = False
        context.signal_used(EVENT_QUEUE)

    # --- guest -> host ---------------------------------------------------------------------------
    def _transmit(self, chain) -> int:
        """One packet from the tx queue (the chain goes back with nothing written)."""
        extra = self.metrics.extra
        self.metrics.requests += 1
        extra["packets_from_guest"] += 1
        if chain.readable_len < HEADER_SIZE:
            self._guest_mistake("short packet", "tx packet of %d bytes is shorter than the %d-byte header",
                                chain.readable_len, HEADER_SIZE)  # fmt: skip
            return 0
        hdr = Header.unpack(gather(chain.readable, 0, HEADER_SIZE))
        if hdr.src_cid != self.guest_cid:
            self._guest_mistake("wrong source CID", "dropped %s: the source CID is not the guest's %d",
                                hdr.describe(), self.guest_cid)  # fmt: skip
            return 0
        if hdr.len > chain.readable_len - HEADER_SIZE:
            self._guest_mistake("length beyond buffer", "%s: len beyond the %d bytes of the packet's buffers",
                                hdr.describe(), chain.readable_len - HEADER_SIZE)  # fmt: skip
            self._reject(hdr)
            return 0
        if hdr.type != TYPE_STREAM or hdr.dst_cid != HOST_CID:
            self._guest_mistake("unsupported packet", "%s of type %d: only streams to the host (CID %d) exist here",
                                hdr.describe(), hdr.type, HOST_CID)  # fmt: skip
            self._reject(hdr)
            return 0
        payload = slice_views(chain.readable, HEADER_SIZE, hdr.len) if hdr.len else []
        self._from_guest(hdr, payload)
        return 0

    def _from_guest(self, hdr: Header, payload: list[memoryview]) -> None:
        key = (hdr.dst_port, hdr.src_port)
        link = self.links.get(key)
        if link is None:
            if hdr.op == OP_REQUEST:
                self._guest_connect(hdr)
            else:
                self._reply_rst(hdr)  # nothing to talk to (an RST is not answered)
            return
        conn = link.conn
        had_credit = conn.peer_credit() > 0
        state = conn.state
        reaction = conn.receive(hdr)
        if reaction is Reaction.RESET:
            self._guest_mistake("protocol error", "%s on a %s stream: reset", hdr.describe(), state.value)
            self._end(link, reset=True)
            return
        if reaction is Reaction.CLOSE:
            self._end(link, reset=hdr.op == OP_RST)
            return
        if reaction is Reaction.DATA:
            self.metrics.extra["bytes_from_guest"] += hdr.len
            self.metrics.bytes_written += hdr.len
            self._to_host(link, payload)
        elif reaction is Reaction.CONNECTED:
            if link.timer is not None:
                link.timer.cancel()
                link.timer = None
            self._to_host(link, [memoryview(b"OK %d\n" % conn.local_port)], preamble=True)
        if key in self.links:
            self._progress(link, credit_gained=not had_credit and conn.peer_credit() > 0)

    def _guest_connect(self, hdr: Header) -> None:
        """The guest connects to host port ``dst_port``: bridge to ``<uds_path>_<port>``."""
        if len(self.links) >= MAX_CONNECTIONS:
            self._guest_mistake("too many connections", "%s refused: %d streams are open", hdr.describe(), MAX_CONNECTIONS)
            self._reply_rst(hdr)
            return
        path = f"{self.uds_path}_{hdr.dst_port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except OSError as err:  # nobody listens (ENOENT, ECONNREFUSED), or its backlog is full (EAGAIN)
            sock.close()
            log.debug("%s: guest port %d -> %s: %s; RST", self.name, hdr.src_port, path, err.strerror or err)
            self._reply_rst(hdr)
            return
        conn = Connection(self.guest_cid, hdr.dst_port, hdr.src_port, host_initiated=False, buf_alloc=self.buf_alloc)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        self._add_link(_Link(conn, sock))

    def _to_host(self, link: _Link, views: list[memoryview], *, preamble: bool = False) -> None:
        """Write guest bytes (or our ``OK`` line: ``preamble``) to the host socket; what it does not
        take now waits in ``link.out``."""
        sent = 0
        if not link.out:
            try:
                sent = link.sock.sendmsg(views, [], socket.MSG_NOSIGNAL)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._host_failed(link)
                return
        total = sum(len(v) for v in views)
        if sent < total:
            link.out += gather(views, sent, total - sent)
        if preamble:
            link.preamble += total - sent
        else:
            link.conn.forwarded(sent)

    def _flush(self, link: _Link) -> None:
        """The host socket is writable: send what waits."""
        conn = link.conn
        while link.out:
            try:
                sent = link.sock.send(link.out, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                break
            except OSError:
                self._host_failed(link)
                return
            del link.out[:sent]
            ours = min(sent, link.preamble)  # the "OK" line precedes every guest byte; it is not guest data
            link.preamble -= ours
            conn.forwarded(sent - ours)
        self._progress(link)

    # --- host -> guest ---------------------------------------------------------------------------
    def _fill_rx(self) -> None:
        """Send what waits (RSTs, control packets, host data) while the guest has receive buffers."""
        context = self.context
        if context is None or not context.queues[RX_QUEUE].ready:
            return
        queue, memory = context.queues[RX_QUEUE], context.memory
        used = False
        while self._rsts or self._ready:
            chain = queue.pop(memory)
            if chain is None:
                if queue.enable_notification(memory):
                    continue
                self._starve()
                break
            self._unstarve()
            length = self._next_packet(chain)
            if length is None:
                queue.undo_pop()
                break
            queue.add_used(memory, chain.head, length)
            used = True
        if used:
            context.signal_used(RX_QUEUE)

    def _starve(self) -> None:
        """No receive buffers: stop reading host sockets until the driver adds some (its kick)."""
        if not self._rx_starved:
            self._rx_starved = True
            for link in list(self.links.values()):
                self._update_interest(link)

    def _unstarve(self) -> None:
        if self._rx_starved:
            self._rx_starved = False
            for link in list(self.links.values()):
                self._update_interest(link)

    def _next_packet(self, chain) -> int | None:
        """Write the next packet into ``chain``; its length, or None when nothing is to be sent."""
        if chain.writable_len < HEADER_SIZE:
            self._guest_mistake("small rx buffer", "receive buffer of %d bytes is below the %d-byte header",
                                chain.writable_len, HEADER_SIZE)  # fmt: skip
            return 0
        while True:
            if self._rsts:  # (ending a stream below may queue one)
                return self._put(chain, self._rsts.popleft())
            if not self._ready:
                return None
            key = self._ready[0]
            link = self.links.get(key)
            if link is None:
                self._unschedule()
                continue
            conn = link.conn
            hdr = conn.next_control()
            if hdr is not None:
                self._ready.rotate(-1)
                return self._put(chain, hdr)
            if not conn.wants_host_data():
                self._unschedule()
                continue
            room = min(conn.peer_credit(), chain.writable_len - HEADER_SIZE, MAX_PACKET_PAYLOAD)
            if room <= 0:
                self._unschedule()  # a header-only buffer: this link waits for a roomier one
                return 0
            try:
                count = link.sock.recvmsg_into(slice_views(chain.writable, HEADER_SIZE, room))[0]
            except BlockingIOError:
                self._unschedule()  # drained: the next readable event brings it back
                self._update_interest(link)
                continue
            except OSError:
                self._host_failed(link)
                continue
            if count == 0:
                conn.host_closed()
                self._progress(link)
                continue
            self._ready.rotate(-1)
            self.metrics.extra["bytes_to_guest"] += count
            self.metrics.bytes_read += count
            return self._put(chain, conn.data_header(count), count)

    def _put(self, chain, hdr: Header, payload: int = 0) -> int:
        scatter(chain.writable, hdr.pack())
        self.metrics.extra["packets_to_guest"] += 1
        return HEADER_SIZE + payload

    def _schedule(self, link: _Link) -> None:
        key = link.conn.key
        if key not in self._scheduled:
            self._scheduled.add(key)
            self._ready.append(key)

    def _unschedule(self) -> None:
        self._scheduled.discard(self._ready.popleft())

    def _reject(self, hdr: Header) -> None:
        """A broken packet: its stream, if there is one, ends with an RST; else just the RST."""
        link = self.links.get((hdr.dst_port, hdr.src_port)) if hdr.dst_cid == HOST_CID else None
        if link is None:
            self._reply_rst(hdr)
        elif hdr.op != OP_RST:
            link.conn.reset()
            self._end(link, reset=True)
        else:
            self._end(link, reset=True)

    def _reply_rst(self, hdr: Header) -> None:
        """Answer a packet that has no stream (or broke one) with an RST; an RST is never answered."""
        if hdr.op == OP_RST:
            return
        if len(self._rsts) >= MAX_QUEUED_RSTS:
            self._guest_mistake("rst queue full", "%s: no room to queue its RST; dropped", hdr.describe())
            return
        self._rsts.append(Header(HOST_CID, self.guest_cid, hdr.dst_port, hdr.src_port, 0, TYPE_STREAM, OP_RST, 0,
                                 self.buf_alloc, 0))  # fmt: skip

    # --- host sockets ----------------------------------------------------------------------------
    def _on_listener(self, _events: int) -> None:
        """A host process connects to uds_path: wait for its CONNECT line."""
        for _ in range(MAX_PENDING_ACCEPTS):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE and the like: the host's problem, keep serving the rest
                log.warning("%s: accept on %s failed: %s", self.name, self.uds_path, err.strerror or err)
                return
            if len(self._accepting) >= MAX_PENDING_ACCEPTS:
                log.warning("%s: %d host connections have not sent CONNECT yet; closing a new one", self.name,
                            MAX_PENDING_ACCEPTS)  # fmt: skip
                sock.close()
                continue
            sock.setblocking(False)
            self._accepting[sock.fileno()] = (sock, bytearray())
            self.host.watch(sock.fileno(), READABLE, lambda ev, fd=sock.fileno(): self._on_connect_line(fd))

    def _on_connect_line(self, fd: int) -> None:
        sock, line = self._accepting[fd]
        try:
            # Peek, then take exactly the line: stream bytes after it belong to the guest.
            data = sock.recv(MAX_CONNECT_LINE - len(line), socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        end = data.find(b"\n")
        if not data or (end < 0 and len(line) + len(data) >= MAX_CONNECT_LINE):
            self._drop_accepting(fd, sock)  # closed before the line, or no line at all
            return
        taken = sock.recv(len(data) if end < 0 else end + 1)
        line += taken
        if end < 0:
            return
        self._drop_accepting(fd, sock, close=False)
        port = _connect_port(bytes(line))
        if port is None or self.context is None or len(self.links) >= MAX_CONNECTIONS:
            why = "not CONNECT <port>" if port is None else "no driver" if self.context is None else "too many streams"
            log.info("%s: host connection on %s refused (%s): %r", self.name, self.uds_path, why, bytes(line[:40]))
            sock.close()
            return
        conn = Connection(self.guest_cid, self._local_port(), port, host_initiated=True, buf_alloc=self.buf_alloc)
        link = _Link(conn, sock)
        self._add_link(link)
        link.timer = self.host.call_later(self.connect_timeout, lambda key=conn.key: self._connect_expired(key))
        self._fill_rx()

    def _drop_accepting(self, fd: int, sock: socket.socket, *, close: bool = True) -> None:
        del self._accepting[fd]
        if self.host is not None:
            self.host.unwatch(fd)
        if close:
            sock.close()

    def _connect_expired(self, key) -> None:
        link = self.links.get(key)
        if link is not None and link.conn.state is State.CONNECTING:
            log.info("%s: guest port %d did not answer within %.0f s", self.name, link.conn.peer_port, self.connect_timeout)
            link.conn.reset()
            self._end(link, reset=True)
            self._fill_rx()

    def _local_port(self) -> int:
        used = {key[0] for key in self.links}
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < 0xFFFFFFFE else FIRST_LOCAL_PORT
            if port not in used:
                return port

    def _add_link(self, link: _Link) -> None:
        self.links[link.conn.key] = link
        self.metrics.extra["connections_opened"] += 1
        self._progress(link)

    def _on_host_event(self, key, events: int) -> None:
        link = self.links.get(key)
        if link is None:
            return
        if link.out and events & (READABLE | WRITABLE):
            self._flush(link)  # (a hang-up shows as READABLE: the send then fails and ends the stream)
        if key in self.links and events & READABLE and link.conn.wants_host_data():
            self._schedule(link)
        self._fill_rx()  # host data, or the credit update / RST that draining brought

    def _progress(self, link: _Link, *, credit_gained: bool = False) -> None:
        """After anything changed on ``link``: half-close, end, re-watch, schedule what is due."""
        conn = link.conn
        if conn.should_shut_host_write():
            conn.host_write_shut = True
            try:
                link.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the host end is gone; reading it tells
        if conn.finished():
            self._end(link, reset=False)
            return
        self._update_interest(link)
        if conn.has_control() or credit_gained:
            self._schedule(link)

    def _update_interest(self, link: _Link) -> None:
        # An fd is unwatched rather than watched for nothing: epoll reports a hang-up even then.
        conn = link.conn
        events = (WRITABLE if link.out else 0) | (READABLE if conn.wants_host_data() and not self._rx_starved else 0)
        if events == link.events or self.host is None:
            return
        if not events:
            self.host.unwatch(link.fd)
        elif not link.events:
            self.host.watch(link.fd, events, lambda ev, key=conn.key: self._on_host_event(key, ev))
        else:
            self.host.modify(link.fd, events)
        link.events = events

    def _host_failed(self, link: _Link) -> None:
        """The host socket failed (the process went away mid-write): reset the stream."""
        link.conn.reset()
        self._end(link, reset=True)

    def _end(self, link: _Link, *, reset: bool) -> None:
        """Forget ``link``, close its host socket (the host sees EOF) and queue the RST it owes."""
        conn = link.conn
        if self.links.pop(conn.key, None) is None:
            return
        if link.timer is not None:
            link.timer.cancel()
        if link.events and self.host is not None:
            self.host.unwatch(link.fd)
        link.sock.close()
        rst = conn.next_control()
        if rst is not None and rst.op == OP_RST and self.context is not None:
            if len(self._rsts) < MAX_QUEUED_RSTS:
                self._rsts.append(rst)
        extra = self.metrics.extra
        extra["connections_closed"] += 1
        if reset:
            extra["connections_reset"] += 1

    def _guest_mistake(self, kind: str, message: str, *args) -> None:
        self.metrics.errors += 1
        self.metrics.extra["packets_dropped"] += 1
        self.guest_log.warning(kind, f"{self.name}: {message}", *args)


def _connect_port(line: bytes) -> int | None:
    """The port of a ``CONNECT <port>\\n`` line, or None."""
    parts = line.rstrip(b"\r\n").split(b" ")
    if len(parts) != 2 or parts[0] != b"CONNECT" or not parts[1].isdigit():
        return None
    port = int(parts[1])
    return port if port <= 0xFFFFFFFF else None


def _listen(path: str) -> socket.socket:
    """The listening Unix socket at ``path``; a stale socket file (nobody listening) is replaced."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise DeviceError(f"virtio-vsock: uds_path {path!r} is longer than the {UNIX_PATH_MAX} bytes a Unix socket path can be")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise DeviceError(f"virtio-vsock: uds_path {path!r}: {err.strerror}") from err
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise DeviceError(f"virtio-vsock: uds_path {path!r} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as err:
            if err.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise DeviceError(f"virtio-vsock: uds_path {path!r}: {err.strerror}") from err
            os.unlink(path)  # stale: left by a VMM that is gone
        else:
            raise DeviceError(f"virtio-vsock: uds_path {path!r} is in use (a process listens on it)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(64)
    except OSError as err:
        sock.close()
        raise DeviceError(f"virtio-vsock: cannot listen on uds_path {path!r}: {err.strerror or err}") from err
    sock.setblocking(False)
    return sock
