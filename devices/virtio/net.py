"""virtio-net (virtio 1.2, section 5.1) over an abstract frame backend.

A backend moves whole frames, each prefixed by the 12-byte ``virtio_net_hdr``
(the layout a TAP with IFF_VNET_HDR and TUNSETVNETHDRSZ=12 uses), and has a
non-blocking pollable fd:

    read_frame(into: memoryview) -> int | None   # one frame's length, None when none is pending
    write_frame(buffers: list[memoryview]) -> None
    fileno() -> int;  close() -> None

Transmit hands the guest's buffers to ``write_frame`` as they are (no copy).
Receive reads one frame into a bounce buffer (its length is unknown until
read) and spreads it over as many receive chains as it needs with
VIRTIO_NET_F_MRG_RXBUF. The fd is watched edge-triggered: the device reads
until the backend is empty or the guest has no buffers left; in the latter
case the frame waits and the guest's next receive-queue kick resumes.

Optional rate limiters, one per direction (Firecracker's ``rx_rate_limiter`` and
``tx_rate_limiter``), charge each frame one op and its bytes (header included). A
transmit chain that does not fit stays in the ring; a received frame that does
not fit stays in the bounce buffer, already read from the backend; either
direction resumes on its limiter's timer.
"""

from __future__ import annotations

import os
import re
import socket
import struct

from pyvmm.devices.ratelimit import RateLimiterConfig
from pyvmm.devices.virtio.device import DEVICE_ID_NET, VirtioDevice
from pyvmm.devices.virtio.throttle import Throttle
from pyvmm.errors import DeviceError
from pyvmm.host.poll import EDGE, READABLE

VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1

NET_HDR_SIZE = 12  # virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
NUM_BUFFERS_OFFSET = 10
MAX_FRAME = NET_HDR_SIZE + 65536 + 64  # largest GSO frame plus an Ethernet/VLAN header, with margin

RX_QUEUE = 0
TX_QUEUE = 1

_MAC_TEXT = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def parse_mac(mac: str | bytes | None) -> bytes:
    """A 6-byte MAC from ``aa:bb:cc:dd:ee:ff`` text, or a random locally administered 52:54:00:xx:xx:xx."""
    if mac is None:
        return bytes([0x52, 0x54, 0x00]) + os.urandom(3)
    if isinstance(mac, bytes) and len(mac) == 6:
        value = mac
    elif isinstance(mac, str) and _MAC_TEXT.match(mac):
        value = bytes(int(part, 16) for part in mac.split(":"))
    else:
        raise DeviceError(f"virtio-net: MAC address {mac!r} is not six hex bytes like 52:54:00:12:34:56")
    if value[0] & 1:
        raise DeviceError(f"virtio-net: MAC address {format_mac(value)} is a multicast address")
    return value


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class SocketBackend:
    """Frames as datagrams on a connected socket (a socketpair in tests, or a userspace switch)."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_frame(self, into: memoryview) -> int | None:
        try:
            return self.sock.recv_into(into)
        except BlockingIOError:
            return None

    def write_frame(self, buffers: list) -> None:
        self.sock.sendmsg(buffers)

    def close(self) -> None:
        self.sock.close()


class VirtioNet(VirtioDevice):
    device_id = DEVICE_ID_NET
    name = "virtio-net"
    queue_sizes = (256, 256)

    def __init__(self, backend, *, mac: str | bytes | None = None, rx_rate_limiter: RateLimiterConfig | None = None,
                 tx_rate_limiter: RateLimiterConfig | None = None):  # fmt: skip
        super().__init__()
        self.backend = backend
        self.mac = parse_mac(mac)
        self.link_up = True
        self._frame = bytearray(MAX_FRAME)
        self._frame_view = memoryview(self._frame)
        self._pending = 0  # length of a received frame still waiting for guest buffers
        self._pending_paid = False  # the pending frame went through the rx limiter already
        self.rx_throttle = Throttle(self, rx_rate_limiter, self.receive)
        self.tx_throttle = Throttle(self, tx_rate_limiter, lambda: self.process_queue(TX_QUEUE))
        self.metrics.extra.update(rx_frames=0, tx_frames=0, rx_dropped=0, tx_dropped=0, rx_throttled=0, tx_throttled=0)

    def device_features(self) -> int:
        return super().device_features() | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_NET_F_STATUS

    def config_space(self) -> bytes:
        return self.mac + struct.pack("<H", VIRTIO_NET_S_LINK_UP if self.link_up else 0)

    def reset(self) -> None:
        super().reset()
        self._pending = 0
        self._pending_paid = False
        self.rx_throttle.cancel()
        self.tx_throttle.cancel()

    def process_queue(self, index: int) -> None:
        if index == TX_QUEUE:
            if self.tx_throttle.drain(TX_QUEUE, lambda chain: chain.readable_len, self._transmit):
                self.metrics.extra["tx_throttled"] = self.tx_throttle.throttled
        elif index == RX_QUEUE:
            self.receive()

    def set_rate_limiters(self, rx: RateLimiterConfig | None = None, tx: RateLimiterConfig | None = None) -> None:
        """New limits from now on (Firecracker's PATCH /network-interfaces); None leaves a direction as it
        is. Call under the transport's lock."""
        if rx is not None:
            self.rx_throttle.configure(rx)
        if tx is not None:
            self.tx_throttle.configure(tx)

    def poll_fds(self):
        return [(self.backend.fileno(), READABLE | EDGE, self._on_readable)]

    def close(self) -> None:
        self.rx_throttle.cancel()
        self.tx_throttle.cancel()
        self.backend.close()

    # --- transmit --------------------------------------------------------
    def _transmit(self, chain) -> int:
        extra = self.metrics.extra
        self.metrics.requests += 1
        if chain.readable_len < NET_HDR_SIZE:
            extra["tx_dropped"] += 1
            self.metrics.errors += 1
            return 0
        try:
            self.backend.write_frame(chain.readable)
        except OSError:
            extra["tx_dropped"] += 1  # a full or vanished backend drops the frame, as a wire would
            return 0
        extra["tx_frames"] += 1
        self.metrics.bytes_written += chain.readable_len - NET_HDR_SIZE
        return 0

    # --- receive ---------------------------------------------------------
    def _on_readable(self, events: int) -> None:
        self.receive()

    def receive(self) -> None:
        """Move frames from the backend into receive buffers until either side runs dry."""
        context = self.context
        if context is None or not context.queues[RX_QUEUE].ready:
            return
        queue, memory = context.queues[RX_QUEUE], context.memory
        throttle = self.rx_throttle
        if throttle.blocked:
            return  # its timer calls again
        limited = throttle.limiter.limits
        delivered = False
        while True:
            if not self._pending:
                if not queue.pending(memory) and not queue.enable_notification(memory):
                    break  # no guest buffers: leave frames in the backend
                try:
                    length = self.backend.read_frame(self._frame_view)
                except OSError:
                    self.metrics.extra["rx_dropped"] += 1
                    break
                if not length:
                    break
                self._pending = length
                self._pending_paid = False
            if limited and not self._pending_paid:
                if not throttle.admit(self._pending):
                    self.metrics.extra["rx_throttled"] = throttle.throttled
                    break  # the frame waits in the bounce buffer for the limiter's timer
                self._pending_paid = True
            if not self._deliver(queue, memory, self._pending):
                break
            self._pending = 0
            self._pending_paid = False
            delivered = True
        if delivered:
            context.signal_used(RX_QUEUE)

    def _deliver(self, queue, memory, length: int) -> bool:
        """Copy the pending frame into receive chains; False when the guest lacks buffers for it."""
        metrics = self.metrics
        if length < NET_HDR_SIZE:
            metrics.extra["rx_dropped"] += 1
            return True
        mergeable = self.context.has(VIRTIO_NET_F_MRG_RXBUF)
        chains, capacity = [], 0
        while capacity < length and (mergeable or not chains):
            chain = queue.pop(memory)
            if chain is None:
                if queue.enable_notification(memory):
                    continue
                for _ in chains:
                    queue.undo_pop()
                return False
            chains.append(chain)
            capacity += chain.writable_len
        if capacity < length:  # one chain too small for the frame (no MRG_RXBUF): drop the frame
            queue.add_used(memory, chains[0].head, 0)
            metrics.extra["rx_dropped"] += 1
            metrics.errors += 1
            return True
        struct.pack_into("<H", self._frame, NUM_BUFFERS_OFFSET, len(chains))
        frame = self._frame_view[:length]
        offset = 0
        for chain in chains:
            start = offset
            for view in chain.writable:
                if offset >= length:
                    break
                size = min(len(view), length - offset)
                view[:size] = frame[offset : offset + size]
                offset += size
            queue.add_used(memory, chain.head, offset - start)
        metrics.requests += 1
        metrics.extra["rx_frames"] += 1
        metrics.bytes_read += length - NET_HDR_SIZE
        return True
