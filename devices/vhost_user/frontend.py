"""The vhost-user front end: requests to a backend over a Unix stream socket, fds beside them.

One ``Frontend`` per backend connection. Every request is written whole (with its fds as
SCM_RIGHTS) and every reply is awaited with a timeout, so a backend that hangs, dies or
answers nonsense costs the caller at most ``timeout`` seconds and ends in one
``VhostUserError`` naming the device and the request; the connection is then unusable
(``broken``) and every later request fails at once with the first cause.

With REPLY_ACK negotiated, requests that have no reply of their own ask for one
(NEED_REPLY) so a backend that refuses, say, a memory table says so there and then.

Requests are serialised by a lock: callers may be a vCPU thread (the driver's DRIVER_OK or
reset) and the VMM thread (close).
"""

from __future__ import annotations

import socket
import threading
import time

from pyvmm.devices.vhost_user import protocol as vu
from pyvmm.devices.vhost_user.protocol import MemRegion, ProtocolError, Request, VringAddr
from pyvmm.errors import DeviceError

DEFAULT_TIMEOUT = 5.0
_MAX_FDS = vu.MAX_MEM_REGIONS


class VhostUserError(DeviceError):
    """The backend failed, refused a request or broke the protocol (one line, naming the device)."""


class Frontend:
    def __init__(self, sock: socket.socket, *, name: str = "vhost-user", timeout: float = DEFAULT_TIMEOUT):
        self.sock = sock
        self.name = name
        self.timeout = timeout
        #: protocol features both sides agreed on (after ``set_protocol_features``)
        self.protocol_features = 0
        self.broken: str | None = None
        self._lock = threading.Lock()
        sock.settimeout(timeout)

    @classmethod
    def connect(cls, path: str, *, name: str = "vhost-user", timeout: float = DEFAULT_TIMEOUT) -> Frontend:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as err:
            sock.close()
            raise VhostUserError(f"{name}: cannot connect to the vhost-user socket {path}: {err.strerror or err}") from err
        return cls(sock, name=name, timeout=timeout)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.broken = self.broken or "connection closed"
        self.sock.close()

    # --- the requests ------------------------------------------------------
    def get_features(self) -> int:
        return vu.decode_u64(self._call(Request.GET_FEATURES))

    def set_features(self, features: int) -> None:
        self._call(Request.SET_FEATURES, vu.u64_payload(features))

    def get_protocol_features(self) -> int:
        return vu.decode_u64(self._call(Request.GET_PROTOCOL_FEATURES))

    def set_protocol_features(self, features: int) -> None:
        """Agree on ``features``; REPLY_ACK applies from the next request on."""
        self._call(Request.SET_PROTOCOL_FEATURES, vu.u64_payload(features))
        self.protocol_features = features

    def set_owner(self) -> None:
        self._call(Request.SET_OWNER)

    def get_queue_num(self) -> int:
        """The most queues the backend serves (needs PROTOCOL_F_MQ)."""
        return vu.decode_u64(self._call(Request.GET_QUEUE_NUM))

    def set_mem_table(self, regions: list[MemRegion], fds: list[int]) -> None:
        """Guest RAM: one fd per region (the same fd may repeat), mapped by the backend at ``mmap_offset``."""
        if len(fds) != len(regions):
            raise ProtocolError(f"{self.name}: SET_MEM_TABLE with {len(regions)} regions needs as many fds, not {len(fds)}")
        self._call(Request.SET_MEM_TABLE, vu.mem_table_payload(regions), fds=fds)

    def set_vring_num(self, index: int, num: int) -> None:
        self._call(Request.SET_VRING_NUM, vu.vring_state_payload(index, num))

    def set_vring_addr(self, addr: VringAddr) -> None:
        self._call(Request.SET_VRING_ADDR, vu.vring_addr_payload(addr))

    def set_vring_base(self, index: int, base: int) -> None:
        self._call(Request.SET_VRING_BASE, vu.vring_state_payload(index, base))

    def get_vring_base(self, index: int) -> int:
        """Stop queue ``index``; returns the next available index the backend would have read."""
        got_index, base = vu.decode_vring_state(self._call(Request.GET_VRING_BASE, vu.vring_state_payload(index, 0)))
        if got_index != index:
            raise self._broken(f"GET_VRING_BASE for queue {index} answered for queue {got_index}")
        return base

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._call(Request.SET_VRING_ENABLE, vu.vring_state_payload(index, int(enable)))

    def _vring_fd(self, request: Request, index: int, fd: int | None) -> None:
        self._call(request, vu.vring_fd_payload(index, fd is not None), fds=[] if fd is None else [fd])

    # --- one round trip ----------------------------------------------------
    def _call(self, request: Request, payload: bytes = b"", *, fds: list[int] = ()) -> bytes:
        """Send ``request``; return its reply's payload (b"" for a request without one)."""
        with self._lock:
            if self.broken:
                raise VhostUserError(f"{self.name}: {request.name}: the vhost-user backend is unusable ({self.broken})")
            reply_size = vu.REPLY_SIZES.get(request)
            ack = reply_size is None and bool(self.protocol_features >> vu.PROTOCOL_F_REPLY_ACK & 1)
            message = vu.encode(request, payload, need_reply=ack)
            try:
                self._send(message, list(fds))
                if reply_size is not None:
                    return self._receive(request, reply_size)
                if ack:
                    status = vu.decode_u64(self._receive(request, 8))
                    if status:
                        raise VhostUserError(f"{self.name}: the vhost-user backend refused {request.name} (status {status})")
                return b""
            except socket.timeout as err:
                raise self._broken(f"{request.name}: no reply from the vhost-user backend within {self.timeout:g} s") from err
            except ProtocolError as err:
                raise self._broken(f"{request.name}: {err}") from err
            except (BrokenPipeError, ConnectionError) as err:
                raise self._broken(f"{request.name}: the vhost-user backend closed the connection") from err
            except OSError as err:
                raise self._broken(f"{request.name}: socket error {err.strerror or err}") from err

    def _broken(self, why: str) -> VhostUserError:
        self.broken = why
        return VhostUserError(f"{self.name}: {why}")

    def _send(self, message: bytes, fds: list[int]) -> None:
        sent = socket.send_fds(self.sock, [message], fds) if fds else self.sock.send(message)
        view = memoryview(message)[sent:]
        while view:  # fds went with the first byte; the rest is plain data
            view = view[self.sock.send(view) :]

    def _receive(self, request: Request, expected_size: int) -> bytes:
        deadline = time.monotonic() + self.timeout
        header = self._read_exactly(vu.HEADER.size, deadline)
        got_request, flags, size = vu.decode_header(header)
        if got_request != request:
            raise ProtocolError(f"the backend answered {vu.request_name(got_request)}")
        vu.check_reply(got_request, flags, size, expected_size=expected_size)
        return self._read_exactly(size, deadline)

    def _read_exactly(self, size: int, deadline: float) -> bytes:
        data = bytearray()
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            self.sock.settimeout(remaining)
            chunk, fds, _flags, _addr = socket.recv_fds(self.sock, size - len(data), _MAX_FDS)
            for fd in fds:  # no reply of ours carries fds: never leak what a backend sends anyway
                _close_quietly(fd)
            if fds:
                raise ProtocolError(f"the backend sent {len(fds)} unexpected fd(s) with a reply")
            if not chunk:
                raise ConnectionResetError()
            data += chunk
        self.sock.settimeout(self.timeout)
        return bytes(data)

    # --- is the connection still there? -----------------------------------
    def check_idle(self) -> VhostUserError | None:
        """Called when the socket became readable between requests (the backend never speaks
        first on this channel): the error that ends the connection, or None for a wake-up that
        means nothing (a reply a request in progress is about to read)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self.broken:
                return VhostUserError(f"{self.name}: {self.broken}")
            self.sock.settimeout(0)  # a socket with a timeout would wait for data that is not coming
            try:
                data = self.sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as err:
                return self._broken(f"socket error {err.strerror or err}")
            finally:
                self.sock.settimeout(self.timeout)
            if not data:
                return self._broken("the vhost-user backend closed the connection")
            return self._broken("the vhost-user backend sent a message nobody asked for")
        finally:
            self._lock.release()


def _close_quietly(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
