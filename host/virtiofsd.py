"""One virtiofsd (QEMU 7.2's C daemon, Debian package qemu-system-common) per shared directory.

``Virtiofsd(path, read_only=...).start()`` runs the daemon on a private vhost-user socket in
a fresh temporary directory (mode 0700) and waits until the socket exists; if the daemon exits
first, or the socket does not appear in time, the error carries the end of its stderr.
``stop()`` sends SIGTERM, then SIGKILL, reaps it and removes the directory. The daemon also
exits by itself when the vhost-user connection closes (so when pyvmm's process dies).

The daemon runs in a mount namespace of its own (``unshare --mount --propagation private``,
root), on a private staging directory where the shared directory is bind-mounted with its
submounts (``mount --rbind``); the host's own mounts are never changed. Three reasons:

- sharing ``/`` (``pyvmm run``): this virtiofsd's sandbox cannot pivot_root onto the current
  root itself (``pivot_root(., .): Device or resource busy``), but can onto the staging mount;
- the host's kernel file systems under the shared directory (proc, sysfs, devtmpfs, cgroup,
  debugfs, ...) are unmounted in the namespace: the guest never sees the host's processes or
  devices through the share;
- read-only shares: this virtiofsd has no read-only option (``--help`` lists none; the Rust
  virtiofsd's ``--readonly`` is not in it), so every mount in the staging tree is remounted
  read-only (``mount -o remount,bind,ro``, one by one: util-linux 2.38's ``ro=recursive``
  does not take effect here), and every write the guest asks for fails in the host kernel with
  EROFS, whatever mount options the guest uses.
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

#: Kernel file systems hidden from the guest: the host's, not the guest's to see.
HIDDEN_FSTYPES = ("proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "securityfs", "debugfs", "tracefs",
                  "bpf", "mqueue", "hugetlbfs", "fusectl", "configfs", "pstore", "efivarfs", "binfmt_misc", "autofs",
                  "rpc_pipefs", "nsfs")  # fmt: skip

#: In the new mount namespace: rbind "$1" (the shared directory) onto "$2" (the staging directory),
#: unmount the hidden kernel file systems below it, remount the rest read-only when "$3" is ro,
#: then exec the daemon (the remaining arguments). findmnt -r escapes odd characters as \xHH.
_NAMESPACE_WRAPPER = r"""
src=$1 stage=$2 mode=$3 hidden=$4; shift 4
mount --rbind -- "$src" "$stage" || exit 97
for entry in $(findmnt -R -n -r -o TARGET,FSTYPE -- "$stage" | sed 's/ /|/'); do
    target=$(printf '%b' "${entry%%|*}"); fstype=${entry#*|}
    case " $hidden " in *" $fstype "*) umount -R -l -- "$target" 2>/dev/null ;; esac
done
if [ "$mode" = ro ]; then
    for target in $(findmnt -R -n -r -o TARGET -- "$stage"); do
        mount -o remount,bind,ro -- "$(printf '%b' "$target")" || exit 98
    done
fi
exec "$@"
"""


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
        staging = os.path.join(self.workdir, "root")
        daemon = [binary, f"--socket-path={self.socket_path}", "-o", f"source={staging}",
                  "-o", "cache=auto", "-o", "no_posix_lock", "-o", "no_flock"]  # fmt: skip
        missing = [tool for tool in ("unshare", "mount", "umount", "findmnt") if shutil.which(tool) is None]
        if missing:
            raise VirtiofsdError(f"{self.name}: sharing a directory needs {', '.join(missing)} (util-linux, mount) on the host")
        return [shutil.which("unshare"), "--mount", "--propagation", "private", "--", "sh", "-c", _NAMESPACE_WRAPPER,
                "sh", self.shared_dir, staging, "ro" if self.read_only else "rw", " ".join(HIDDEN_FSTYPES), *daemon]  # fmt: skip

    def start(self) -> Virtiofsd:
        if not os.path.isdir(self.shared_dir):
            raise VirtiofsdError(f"{self.name}: shared directory {self.shared_dir} does not exist")
        self.workdir = tempfile.mkdtemp(prefix="pyvmm-virtiofsd-")
        self.socket_path = os.path.join(self.workdir, "vhost-user.sock")
        os.mkdir(os.path.join(self.workdir, "root"))
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
