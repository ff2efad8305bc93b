"""The host side of the guest agent: run a command in the guest over vsock and collect or stream it.

The connection goes through the vsock device's host socket with Firecracker's
convention (``CONNECT <port>\\n`` answered by ``OK <host port>\\n``), so the agent
is reached the same way any Firecracker tool reaches a guest service. Frames are
pyvmm/run/agent.py's.
"""

from __future__ import annotations

import json
import os
import selectors
import signal as signals
import socket
import time
from dataclasses import dataclass
from typing import BinaryIO

from pyvmm.errors import PyvmmError
from pyvmm.run import agent

#: how long the agent may take to report a command's end after its timeout killed it
KILL_GRACE = 10.0


class AgentError(PyvmmError):
    """The guest agent could not be reached or broke the protocol; the message says which."""


@dataclass(frozen=True)
class CommandResult:
    #: as a shell reports it: the exit code, or 128 + the signal that killed the command
    status: int
    stdout: bytes
    stderr: bytes
    #: the signal that ended the command (None when it exited)
    signal: int | None = None
    timed_out: bool = False

    def __iter__(self):
        """``status, stdout, stderr = vm.exec(...)``."""
        return iter((self.status, self.stdout, self.stderr))


def connect_vsock(uds_path: str, port: int, *, timeout: float = 5.0) -> socket.socket:
    """A stream to the guest's listener on vsock ``port`` through the device's host socket
    (Firecracker's ``CONNECT``); retried until ``timeout`` while the guest is not listening yet."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.connect(str(uds_path))
            sock.sendall(f"CONNECT {port}\n".encode())
            reply = b""
            while not reply.endswith(b"\n") and len(reply) < 64:
                chunk = sock.recv(1)
                if not chunk:
                    break
                reply += chunk
            if reply.startswith(b"OK "):
                sock.settimeout(None)
                return sock
            last = f"the device answered {reply!r}" if reply else "nothing listens on that port yet"
        except (OSError, socket.timeout) as err:
            last = getattr(err, "strerror", None) or str(err) or type(err).__name__
        sock.close()
        if time.monotonic() >= deadline:
            raise AgentError(f"cannot reach vsock port {port} through {uds_path}: {last}")
        time.sleep(0.05)


def run_command(sock: socket.socket, argv: list[str], *, input: bytes | None = None, stdin: BinaryIO | None = None,
                stdout: BinaryIO | None = None, stderr: BinaryIO | None = None, timeout: float | None = None,
                env: dict | None = None, cwd: str | None = None, uid: int | None = None, gid: int | None = None,
                groups: list[int] | None = None) -> CommandResult:  # fmt: skip
    """Run ``argv`` through the agent on ``sock`` (closed when done). Input is ``input`` (all at once)
    or read from ``stdin`` as it comes; output goes to ``stdout``/``stderr`` as it arrives, else it is
    collected into the result. ``timeout``: the agent kills the command's process group after it."""
    if not argv or not isinstance(argv, (list, tuple)) or not all(isinstance(a, str) for a in argv):
        sock.close()
        raise AgentError(f"a command is a non-empty list of strings, not {argv!r}")
    request = {"argv": list(argv), "env": env, "cwd": cwd, "uid": uid, "gid": gid, "groups": groups, "timeout": timeout}
    decoder = agent.FrameDecoder((agent.STARTED, agent.STDOUT, agent.STDERR, agent.EXIT, agent.ERROR))
    collected = {agent.STDOUT: bytearray(), agent.STDERR: bytearray()}
    sinks = {agent.STDOUT: stdout, agent.STDERR: stderr}
    # Everything to send waits in ``outgoing`` and leaves as the socket takes it, while output is
    # read: a command that writes before it reads its input must not deadlock the two sides.
    outgoing = bytearray(agent.json_frame(agent.REQUEST, request))
    if input is not None:
        for start in range(0, len(input), agent.MAX_FRAME):
            outgoing += agent.frame(agent.STDIN, input[start : start + agent.MAX_FRAME])
    if stdin is None:
        outgoing += agent.frame(agent.STDIN_EOF)
    selector = selectors.DefaultSelector()
    try:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        reading_stdin, input_refused, stdin_done = stdin is not None, False, False
        if reading_stdin:
            try:
                selector.register(stdin, selectors.EVENT_READ)
            except PermissionError:  # a regular file (or /dev/null): not pollable, and never blocks
                data = stdin.read()
                for start in range(0, len(data), agent.MAX_FRAME):
                    outgoing += agent.frame(agent.STDIN, data[start : start + agent.MAX_FRAME])
                outgoing += agent.frame(agent.STDIN_EOF)
                reading_stdin, stdin_done = False, True
        deadline = None if timeout is None else time.monotonic() + timeout + KILL_GRACE
        while True:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise AgentError(f"the guest agent did not report the end of {argv[0]!r} within {timeout + KILL_GRACE:.0f} s")
            for key, events in selector.select(wait):
                if key.fileobj is not sock:
                    data = os.read(key.fd, agent.READ_CHUNK)
                    if not input_refused:
                        outgoing += agent.frame(agent.STDIN, data) if data else agent.frame(agent.STDIN_EOF)
                    if not data or input_refused:
                        selector.unregister(key.fileobj)
                        reading_stdin, stdin_done = False, True
                    continue
                if events & selectors.EVENT_WRITE and outgoing:
                    try:
                        del outgoing[: sock.send(outgoing)]
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        outgoing.clear()  # the command ended without reading it all; its EXIT is on the way
                        input_refused = True
                if events & selectors.EVENT_READ:
                    try:
                        data = sock.recv(agent.READ_CHUNK)
                    except BlockingIOError:
                        continue
                    if not data:
                        raise AgentError(f"the guest agent closed the connection before {argv[0]!r} ended")
                    for kind, payload in decoder.feed(data):
                        if kind in sinks:
                            if sinks[kind] is not None:
                                sinks[kind].write(payload)
                                sinks[kind].flush()
                            else:
                                collected[kind] += payload
                        elif kind == agent.ERROR:
                            raise AgentError(json.loads(payload)["message"])
                        elif kind == agent.EXIT:
                            end = json.loads(payload)
                            return CommandResult(int(end["status"]), bytes(collected[agent.STDOUT]),
                                                 bytes(collected[agent.STDERR]), end.get("signal"),
                                                 bool(end.get("timed_out")))  # fmt: skip
            selector.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if outgoing else 0))
            if reading_stdin and len(outgoing) > agent.MAX_STDIN_BUFFER:  # backpressure on the user's input
                selector.unregister(stdin)
                reading_stdin = False
            elif stdin is not None and not reading_stdin and not stdin_done and not input_refused \
                    and len(outgoing) < agent.MAX_STDIN_BUFFER // 2:  # fmt: skip
                selector.register(stdin, selectors.EVENT_READ)
                reading_stdin = True
    except agent.ProtocolError as err:
        raise AgentError(f"the guest agent broke the protocol: {err}") from err
    except OSError as err:
        raise AgentError(f"the connection to the guest agent failed: {err.strerror or err}") from err
    finally:
        selector.close()
        sock.close()


def send_signal(sock: socket.socket, number: int = signals.SIGINT) -> None:
    """Forward a signal to the running command's process group (e.g. the user's Ctrl-C)."""
    sock.sendall(agent.json_frame(agent.SIGNAL, {"signal": int(number)}))
