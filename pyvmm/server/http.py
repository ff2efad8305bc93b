"""HTTP/1.1 on a Unix socket for the Firecracker API: the standard library's server, nothing hand-parsed.

``socketserver.ThreadingUnixStreamServer`` accepts; ``http.server.BaseHTTPRequestHandler``
parses requests (keep-alive, Content-Length); ``routes.FirecrackerApi.handle``
decides the answer. The socket file is created with mode 0600 (as Firecracker's)
and removed on close; a stale one from a dead process is replaced, a live one is
refused.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import stat
import threading
from http.server import BaseHTTPRequestHandler

from pyvmm.errors import PyvmmError

log = logging.getLogger("pyvmm.api")

MAX_BODY = 1 << 20  # a Firecracker request body is a few hundred bytes


class ApiSocketError(PyvmmError):
    """The API socket cannot be created where asked."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pyvmm"
    sys_version = ""

    def _serve(self) -> None:
        length = self.headers.get("Content-Length", "0")
        try:
            size = int(length)
        except ValueError:
            size = -1
        if not 0 <= size <= MAX_BODY:
            self._send(400, b'{"fault_message": "bad Content-Length: %s"}' % length.encode()[:40])
            return
        body = self.rfile.read(size) if size else b""
        response = self.server.api.handle(self.command, self.path, body)
        self._send(response.status, response.encoded(), response.allow)

    def _send(self, status: int, payload: bytes, allow=()) -> None:
        self.send_response(status)
        if allow:
            self.send_header("Allow", ", ".join(allow))
        if payload:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = do_HEAD = do_OPTIONS = do_TRACE = _serve

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("api: " + format, *args)

    def address_string(self) -> str:
        return "unix"


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False


class ApiServer:
    """Serves ``api`` on the Unix socket ``path`` from a background thread."""

    def __init__(self, path: str | os.PathLike, api):
        self.path = os.fspath(path)
        _clear_stale_socket(self.path)
        try:
            old_umask = os.umask(0o177)
            try:
                self._server = _Server(self.path, _Handler)
            finally:
                os.umask(old_umask)
        except OSError as err:
            raise ApiSocketError(f"cannot create the API socket {self.path}: {err.strerror}") from err
        self._server.api = api
        self._thread = threading.Thread(target=self._server.serve_forever, name="api-server", daemon=True)
        self._thread.start()
        log.info("API listening on %s", self.path)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _clear_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ApiSocketError(f"cannot create the API socket {path}: a file that is not a socket is there")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a dead process's socket
        return
    finally:
        probe.close()
    raise ApiSocketError(f"cannot create the API socket {path}: another process is serving on it")
