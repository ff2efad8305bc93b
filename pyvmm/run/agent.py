"""pyvmm's guest agent: runs commands for the host over vsock. Standard library only.

The guest runs this file with the host's Python from the shared host root
(``python3 agent.py --port 1024``); the host side is ``pyvmm/run/session.py``.
One connection carries one command. Both directions are frames::

    u8 kind, u32 LE length, payload (at most MAX_FRAME bytes)

host -> agent: REQUEST (JSON: argv, env, cwd, uid, gid, timeout), STDIN (bytes),
STDIN_EOF, SIGNAL (JSON: signal number for the command's process group).
agent -> host: STARTED (JSON: pid), STDOUT, STDERR (bytes), EXIT (JSON: status
as a shell reports it (128 + signal for a killed command), signal, timed_out),
ERROR (JSON: message, when the command cannot be started).

``FrameDecoder`` is sans-IO (the host imports it too). Several connections are
served at once, each on its own thread; a command that outlives its timeout is
killed with its process group and reported with ``timed_out``, and the agent
goes on serving.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

REQUEST, STDIN, STDIN_EOF, SIGNAL = 1, 2, 3, 4
STARTED, STDOUT, STDERR, EXIT, ERROR = 16, 17, 18, 19, 20
KIND_NAMES = {REQUEST: "REQUEST", STDIN: "STDIN", STDIN_EOF: "STDIN_EOF", SIGNAL: "SIGNAL", STARTED: "STARTED",
              STDOUT: "STDOUT", STDERR: "STDERR", EXIT: "EXIT", ERROR: "ERROR"}  # fmt: skip
HEADER = struct.Struct("<BI")
MAX_FRAME = 1 << 20
DEFAULT_PORT = 1024
#: what the agent sends to the host's ready port once it listens (``--ready-port``)
READY = b"pyvmm-agent ready\n"
READ_CHUNK = 1 << 16
MAX_STDIN_BUFFER = 1 << 20
LINGER = 5.0  # s the agent waits for the host to close after EXIT


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol."""


def frame(kind: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"a {KIND_NAMES.get(kind, kind)} frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(kind, len(payload)) + payload


def json_frame(kind: int, body: dict) -> bytes:
    return frame(kind, json.dumps(body).encode())


class FrameDecoder:
    """Bytes in, ``(kind, payload)`` frames out; refuses unknown kinds and oversized frames."""

    def __init__(self, kinds=tuple(KIND_NAMES)):
        self._buffer = bytearray()
        self._kinds = frozenset(kinds)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._buffer)
            if kind not in self._kinds:
                raise ProtocolError(f"unknown frame kind {kind}")
            if length > MAX_FRAME:
                raise ProtocolError(f"a frame of {length} bytes exceeds {MAX_FRAME}")
            if len(self._buffer) < HEADER.size + length:
                break
            frames.append((kind, bytes(self._buffer[HEADER.size : HEADER.size + length])))
            del self._buffer[: HEADER.size + length]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


def exit_status(returncode: int) -> tuple[int, int | None]:
    """(status as a shell shows it, the signal that killed the command or None)."""
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, None


# ------------------------------------------------------------------------------ the agent
def _send_all(sock: socket.socket, data: bytes, lock: threading.Lock) -> None:
    with lock:
        sock.sendall(data)


def _serve(sock: socket.socket) -> None:
    """One connection: read the REQUEST, run the command, stream, report its exit."""
    lock = threading.Lock()
    decoder = FrameDecoder((REQUEST, STDIN, STDIN_EOF, SIGNAL))
    pending: list[tuple[int, bytes]] = []
    while not pending:
        data = sock.recv(READ_CHUNK)
        if not data:
            return
        pending += decoder.feed(data)
    kind, payload = pending.pop(0)
    if kind != REQUEST:
        raise ProtocolError(f"the first frame is {KIND_NAMES[kind]}, not REQUEST")
    request = json.loads(payload)
    try:
        proc = subprocess.Popen(
            request["argv"], cwd=request.get("cwd") or "/", env=request.get("env"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            user=request.get("uid"), group=request.get("gid"), extra_groups=request.get("groups"),
            start_new_session=True,
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as err:
        _send_all(sock, json_frame(ERROR, {"message": f"cannot run {request.get('argv')!r}: {err}"}), lock)
        return
    _send_all(sock, json_frame(STARTED, {"pid": proc.pid}), lock)
    timeout = request.get("timeout")
    deadline = None if timeout is None else time.monotonic() + float(timeout)
    timed_out = host_gone = False
    selector = selectors.DefaultSelector()
    outputs = {proc.stdout.fileno(): STDOUT, proc.stderr.fileno(): STDERR}
    for fd in (*outputs, proc.stdin.fileno()):
        os.set_blocking(fd, False)
    for fd in outputs:
        selector.register(fd, selectors.EVENT_READ)
    selector.register(sock, selectors.EVENT_READ)
    stdin_fd = proc.stdin.fileno()
    # Input waits here until the command reads it; past MAX_STDIN_BUFFER the socket is not read
    # (the host's sends then block: backpressure instead of unbounded memory).
    stdin_buffer, stdin_eof, watching = bytearray(), False, {"sock": True, "stdin": False}

    def close_stdin() -> None:
        if watching["stdin"]:
            selector.unregister(stdin_fd)
            watching["stdin"] = False
        if not proc.stdin.closed:
            proc.stdin.close()

    def update_watches() -> None:
        want_stdin = bool(stdin_buffer) and not proc.stdin.closed
        if want_stdin != watching["stdin"]:
            (selector.register if want_stdin else selector.unregister)(stdin_fd, *((selectors.EVENT_WRITE,) if want_stdin else ()))
            watching["stdin"] = want_stdin
        want_sock = not host_gone and len(stdin_buffer) < MAX_STDIN_BUFFER
        if want_sock != watching["sock"]:
            (selector.register if want_sock else selector.unregister)(sock, *((selectors.EVENT_READ,) if want_sock else ()))
            watching["sock"] = want_sock
        if stdin_eof and not stdin_buffer and not proc.stdin.closed:
            close_stdin()

    def take(frames) -> None:
        nonlocal stdin_eof
        for kind, payload in frames:
            if kind == STDIN and not stdin_eof and not proc.stdin.closed:
                stdin_buffer.extend(payload)
            elif kind == STDIN_EOF:
                stdin_eof = True
            elif kind == SIGNAL:
                _signal_group(proc, int(json.loads(payload)["signal"]))

    take(pending)
    update_watches()
    while outputs:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        for key, _ in selector.select(wait):
            fd = key.fd
            if fd in outputs:
                data = os.read(fd, READ_CHUNK)
                if data:
                    _send_all(sock, frame(outputs[fd], data), lock)
                else:
                    selector.unregister(fd)
                    del outputs[fd]
            elif fd == stdin_fd:
                try:
                    del stdin_buffer[: os.write(stdin_fd, stdin_buffer)]
                except BlockingIOError:
                    pass
                except BrokenPipeError:  # the command closed its input: drop the rest
                    stdin_buffer.clear()
                    close_stdin()
            else:
                data = sock.recv(READ_CHUNK)
                if data:
                    take(decoder.feed(data))
                else:  # the host went away: end the command
                    host_gone = True
                    _signal_group(proc, signal.SIGKILL)
        update_watches()
        if deadline is not None and time.monotonic() >= deadline:
            timed_out, deadline = True, None
            _signal_group(proc, signal.SIGKILL)
    selector.close()
    if not proc.stdin.closed:
        proc.stdin.close()
    status, killed_by = exit_status(proc.wait())
    if not host_gone:
        _send_all(sock, json_frame(EXIT, {"status": status, "signal": killed_by, "timed_out": timed_out}), lock)
        # Let the host read EXIT before the connection goes: closing with its unread input still
        # queued here would reset the stream on some transports. It closes once it has EXIT.
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(LINGER)
        try:
            while sock.recv(READ_CHUNK):
                pass
        except OSError:
            pass


def _signal_group(proc: subprocess.Popen, number: int) -> None:
    try:
        os.killpg(proc.pid, number)
    except ProcessLookupError:
        pass


def _connection(sock: socket.socket) -> None:
    try:
        _serve(sock)
    except (OSError, ProtocolError, ValueError) as err:
        print(f"pyvmm-agent: connection ended: {err}", file=sys.stderr, flush=True)
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="pyvmm guest agent")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--ready-port", type=int, help="tell the host (CID 2) on this port once listening")
    args = parser.parse_args(argv)
    server = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    server.bind((socket.VMADDR_CID_ANY, args.port))
    server.listen(16)
    print(f"pyvmm-agent: listening on vsock port {args.port}", flush=True)
    if args.ready_port is not None:
        try:
            with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as ready:
                ready.connect((socket.VMADDR_CID_HOST, args.ready_port))
                ready.sendall(READY)
        except OSError as err:
            print(f"pyvmm-agent: could not tell the host it is ready: {err}", file=sys.stderr, flush=True)
    while True:
        sock, _ = server.accept()
        threading.Thread(target=_connection, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
