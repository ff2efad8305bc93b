"""A guest-side virtio-vsock driver for unit tests: MockDriver rings, Linux 6.1's buffer layout
(receive chains of a 44-byte header buffer plus a 4 KiB data buffer; transmit chains of the header
then the payload), and a ``pump`` that plays a level-triggered event loop over ``ManualHost``.

Without ``attach`` the transport serves a kick synchronously, so every ``send`` has been handled
when it returns.
"""

from __future__ import annotations

import select

from pyvmm.devices.virtio.mock_driver import ManualHost, mock_guest
from pyvmm.devices.virtio.vsock.device import EVENT_QUEUE, RX_QUEUE, TX_QUEUE, VirtioVsock
from pyvmm.devices.virtio.vsock.packet import (
    HEADER_SIZE,
    HOST_CID,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    TYPE_STREAM,
    Header,
)
from pyvmm.host.poll import READABLE, WRITABLE

GUEST_CID = 3
RX_BUF = 4096


class VsockGuest:
    def __init__(self, device: VirtioVsock, *, rx_buffers: int = 64, memory_size: int = 8 << 20, buf_alloc: int = 256 << 10):
        self.device = device
        self.host = ManualHost()
        self.driver = mock_guest(device, memory_size)
        device.attach_host(self.host)
        self.buf_alloc = buf_alloc  # what this guest advertises
        self.fwd_cnt = 0  # payload bytes this guest has consumed
        self.driver.setup()
        self.rx, self.tx, self.events = (self.driver.queues[i] for i in (RX_QUEUE, TX_QUEUE, EVENT_QUEUE))
        self.tx_header = self.driver.alloc(HEADER_SIZE)
        self.tx_payload = self.driver.alloc(64 << 10)
        self._rx_slots: dict[int, tuple[int, int]] = {}  # head -> (header addr, data addr)
        self._free_pairs = [(self.driver.alloc(HEADER_SIZE), self.driver.alloc(RX_BUF)) for _ in range(rx_buffers)]
        self.post_rx(rx_buffers)

    # --- receive ---------------------------------------------------------------------------
    def post_rx(self, count: int, *, kick: bool = True) -> None:
        for _ in range(count):
            header, data = self._free_pairs.pop()
            head = self.rx.add([(header, HEADER_SIZE, True), (data, RX_BUF, True)], kick=False)
            self._rx_slots[head] = (header, data)
        if kick:
            self.rx.kick()

    def recv(self, *, repost: bool = True) -> list[tuple[Header, bytes]]:
        """The packets the device delivered since the last call (buffers re-posted unless told not to)."""
        packets = []
        memory = self.driver.memory
        for head, length in self.rx.take_used():
            header_addr, data_addr = self._rx_slots.pop(head)
            hdr = Header.unpack(memory.read(header_addr, HEADER_SIZE))
            assert length == HEADER_SIZE + hdr.len, (length, hdr)
            packets.append((hdr, memory.read(data_addr, hdr.len)))
            self._free_pairs.append((header_addr, data_addr))
        if repost and packets:
            self.post_rx(len(packets))
        return packets

    # --- transmit ----------------------------------------------------------------------------
    def header(self, op: int, guest_port: int, host_port: int, *, length: int = 0, flags: int = 0,
               src_cid: int = GUEST_CID, dst_cid: int = HOST_CID, type_: int = TYPE_STREAM) -> Header:  # fmt: skip
        return Header(src_cid, dst_cid, guest_port, host_port, length, type_, op, flags, self.buf_alloc,
                      self.fwd_cnt & 0xFFFFFFFF)  # fmt: skip

    def send(self, hdr: Header, payload: bytes = b"") -> None:
        memory = self.driver.memory
        memory.write(self.tx_header, hdr.pack())
        buffers = [(self.tx_header, HEADER_SIZE, False)]
        if payload:
            memory.write(self.tx_payload, payload)
            buffers.append((self.tx_payload, len(payload), False))
        self.tx.add(buffers)
        self.tx.take_used()

    def send_raw(self, buffers: list[bytes]) -> None:
        """A transmit chain of arbitrary readable buffers (for malformed packets)."""
        addr = self.tx_payload
        chain = []
        for data in buffers:
            self.driver.memory.write(addr, data)
            chain.append((addr, len(data), False))
            addr += len(data)
        self.tx.add(chain)
        self.tx.take_used()

    def consume(self, count: int) -> None:
        """The guest application read ``count`` bytes: its fwd_cnt moves."""
        self.fwd_cnt += count

    def credit_update(self, guest_port: int, host_port: int) -> None:
        self.send(self.header(OP_CREDIT_UPDATE, guest_port, host_port))

    # --- the host side, as the event loop would run it -----------------------------------------------------
    def pump(self, rounds: int = 50) -> None:
        """Fire the ready watched fds (level-triggered) until nothing is ready."""
        for _ in range(rounds):
            watched = dict(self.host.watched)
            if not watched:
                return
            readers = [fd for fd, (ev, _) in watched.items() if ev & READABLE]
            writers = [fd for fd, (ev, _) in watched.items() if ev & WRITABLE]
            ready_r, ready_w, _ = select.select(readers, writers, [], 0)
            if not ready_r and not ready_w:
                return
            for fd in set(ready_r) | set(ready_w):
                if fd in self.host.watched:
                    self.host.fire(fd, (READABLE if fd in ready_r else 0) | (WRITABLE if fd in ready_w else 0))

    # --- whole exchanges --------------------------------------------------------------------------------
    def accept_request(self, port: int) -> Header:
        """Answer the device's REQUEST to guest ``port`` with a RESPONSE; the REQUEST."""
        self.pump()
        packets = self.recv()
        requests = [h for h, _ in packets if h.op == OP_REQUEST and h.dst_port == port]
        assert requests, packets
        request = requests[0]
        self.send(self.header(OP_RESPONSE, port, request.src_port))
        return request

    def connect(self, guest_port: int, host_port: int) -> Header:
        """Connect to the host's ``host_port``; the device's answer."""
        self.send(self.header(OP_REQUEST, guest_port, host_port))
        packets = self.recv()
        assert len(packets) == 1, packets
        return packets[0][0]

    def read_stream(self, guest_port: int, *, consume: bool = True) -> tuple[bytes, list[Header]]:
        """Payload of the RW packets for ``guest_port`` delivered now, and every other packet."""
        data, others = bytearray(), []
        for hdr, payload in self.recv():
            if hdr.op == OP_RW and hdr.dst_port == guest_port:
                data += payload
            else:
                others.append(hdr)
        if consume:
            self.consume(len(data))
        return bytes(data), others


__all__ = ["VsockGuest", "GUEST_CID", "OP_REQUEST", "OP_RESPONSE", "OP_RST", "OP_RW", "OP_SHUTDOWN", "OP_CREDIT_UPDATE"]
