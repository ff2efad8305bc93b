"""One virtiofsd (QEMU 7.2's C daemon, Debian package qemu-system-common) per shared directory.

``Virtiofsd(path, read_only=...).start()`` runs the daemon on a private vhost-user socket in
a fresh temporary directory (mode 0700) and waits until the socket exists; if the daemon exits
first, or the socket does not appear in time, the error carries the end of its stderr.
``stop()`` sends SIGTERM, then SIGKILL, reaps it and removes the directory. The daemon also
exits by itself when the vhost-user connection closes (so when pyvmm's process dies).

Read-only shares: this virtiofsd has no read-only option (``--help`` lists none; the Rust
virtiofsd's ``--readonly`` is not in it). pyvmm enforces read-only on the host instead: the
daemon is started through ``unshare --mount --propagation private`` in a new mount namespace
where the shared directory is first bind-mounted onto itself and remounted read-only
(``mount --bind DIR DIR; mount -o remount,bind,ro DIR``). virtiofsd's own sandbox then
bind-mounts that read-only mount as its root, so every write the guest asks for fails in the
host kernel with EROFS; the host's view of the directory is untouched (the mounts live only in
the daemon's namespace). This needs root (CAP_SYS_ADMIN), as virtiofsd's sandbox does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from pyvmm.errors import DeviceError

DEFAULT_BINARY = "/usr/lib/qemu/virtiofsd"
DEBIAN_PACKAGE = "qemu-system-common"
STDERR_TAIL = 600  # characters of the daemon's stderr in an error

#: bind-mount "$1" read-only onto itself in this (new, private) mount namespace, then run the rest
_READ_ONLY_WRAPPER = 'mount --bind -- "$1" "$1" && mount -o remount,bind,ro -- "$1" && shift && exec "$@"'


class VirtiofsdError(DeviceError):
    """virtiofsd is missing, would not start, or died (one line, with the end of its stderr)."""


def find_binary(binary: str | None = None) -> str:
    """The virtiofsd to run: ``binary``, $PYVMM_VIRTIOFSD, or Debian's path."""
    path = binary or os.environ.get("PYVMM_VIRTIOFSD") or DEFAULT_BINARY
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise VirtiofsdError(f"virtiofsd not found at {path}: install Debian's {DEBIAN_PACKAGE} package "
                             f"(or set PYVMM_VIRTIOFSD)")  # fmt: skip
    return path


class Virtiofsd:
    def __init__(self, shared_dir: str | os.PathLike, *, read_only: bool = False, binary: str | None = None,
                 name: str = "virtiofsd", start_timeout: float = 10.0):  # fmt: skip
        self.shared_dir = str(Path(shared_dir).resolve())
        self.read_only = read_only
        self.binary = binary
        self.name = name
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.workdir: str | None = None
        self.socket_path: str | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def command(self) -> list[str]:
        binary = find_binary(self.binary)
        daemon = [binary, f"--socket-path={self.socket_path}", "-o", f"source={self.shared_dir}",
                  "-o", "cache=auto", "-o", "no_posix_lock", "-o", "no_flock"]  # fmt: skip
        if not self.read_only:
            return daemon
        unshare = shutil.which("unshare")
        if unshare is None or shutil.which("mount") is None:
            raise VirtiofsdError(f"{self.name}: a read-only share needs unshare and mount (util-linux, mount) on the host")
        return [unshare, "--mount", "--propagation", "private", "--", "sh", "-c", _READ_ONLY_WRAPPER, "sh",
                self.shared_dir, *daemon]  # fmt: skip

    def start(self) -> Virtiofsd:
        if not os.path.isdir(self.shared_dir):
            raise VirtiofsdError(f"{self.name}: shared directory {self.shared_dir} does not exist")
        self.workdir = tempfile.mkdtemp(prefix="pyvmm-virtiofsd-")
        self.socket_path = os.path.join(self.workdir, "vhost-user.sock")
        stderr_path = os.path.join(self.workdir, "stderr")
        try:
            command = self.command()
            with open(stderr_path, "wb") as stderr:
                self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                                close_fds=True, start_new_session=True)  # fmt: skip
            self._wait_for_socket()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_socket(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        delay = 0.005
        while not os.path.exists(self.socket_path):
            status = self.process.poll()
            if status is not None:
                raise VirtiofsdError(f"{self.name}: virtiofsd exited with status {status} before listening: {self.stderr_tail()}")
            if time.monotonic() > deadline:
                raise VirtiofsdError(f"{self.name}: virtiofsd did not create its socket within {self.start_timeout:g} s: "
                                     f"{self.stderr_tail()}")  # fmt: skip
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def stderr_tail(self) -> str:
        """The end of the daemon's stderr, as one line."""
        try:
            text = Path(self.workdir, "stderr").read_bytes()[-4096:].decode(errors="replace")
        except (OSError, TypeError):
            return "(no stderr)"
        text = " | ".join(line.strip() for line in text.splitlines() if line.strip())
        return text[-STDERR_TAIL:] or "(no stderr)"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``, to the daemon's process group (its sandbox runs
        in a child process); reap it; remove the socket directory. Idempotent."""
        process, self.process = self.process, None
        if process is not None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                _signal_group(process.pid, sig)
                try:
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            _signal_group(process.pid, signal.SIGKILL)  # a sandbox child that outlived its parent
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> Virtiofsd:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)  # start_new_session: the daemon leads its own group
    except (ProcessLookupError, PermissionError):
        pass
