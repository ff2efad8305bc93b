"""Boot a VM whose root is the host's own file system, with pyvmm's agent waiting for commands.

``start(RunOptions(...))`` makes the initramfs (pyvmm/run/initramfs.py), boots the
kernel with the host root shared over virtio-fs (read-only unless ``rw``) and a
vsock device, and returns once the guest agent answers, ready for ``vm.exec``.
``pyvmm run -- CMD`` (pyvmm/cli.py) and embedding code use it the same way.

The kernel: the one given, else Debian's cloud kernel from ``pyvmm fetch-kernel``'s
cache (``PYVMM_KERNEL_DIR``, ~/.cache/pyvmm/kernel) or, in a source checkout, the
test suite's tests/assets. Its drivers (virtio-mmio, virtio-fs, vsock) come from
that cache's module tree when the release matches, else they must be built in.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.errors import PyvmmError
from pyvmm.run import agent, initramfs
from pyvmm.run.debian import default_cache

log = logging.getLogger("pyvmm.run")

GUEST_CID = 3
READY_PORT = 1025
CMDLINE = "console=ttyS0 quiet panic=-1 reboot=k rdinit=/init"


class RunError(PyvmmError):
    """The command VM cannot be made or did not come up; the message says why (and the console's last lines)."""


@dataclass
class RunOptions:
    kernel: Path | None = None
    accel: str | None = None
    memory_mib: int = 512
    vcpus: int = 1
    #: share the host root writable (default: read-only, with tmpfs on /tmp, /run, /var/tmp)
    rw: bool = False
    #: more host directories, shared writable at the same paths
    shares: list[Path] = field(default_factory=list)
    #: seconds the guest may take from boot to a listening agent
    boot_timeout: float = 120.0
    #: a virtio-net NIC on this TAP device, and the guest's address on it ("10.0.2.15/24")
    tap: str | None = None
    address: str | None = None


@dataclass(frozen=True)
class KernelAssets:
    kernel: Path
    busybox: Path
    module_root: Path | None
    release: str | None


def asset_dirs() -> list[Path]:
    """Where a fetched kernel may be: the user's cache, then a source checkout's tests/assets."""
    dirs = [default_cache()]
    checkout = Path(__file__).resolve().parents[2] / "tests" / "assets"
    if checkout.is_dir():
        dirs.append(checkout)
    return dirs


def find_assets(kernel: Path | None) -> KernelAssets:
    cache = next((d for d in asset_dirs() if (d / "vmlinux").is_file() and (d / "busybox").is_file()), None)
    if kernel is None:
        if cache is None:
            raise RunError(f"no kernel given and none fetched (looked in {', '.join(map(str, asset_dirs()))}): "
                           "run `pyvmm fetch-kernel` once, or give --kernel")  # fmt: skip
        kernel = cache / "vmlinux"
    elif not kernel.is_file():
        raise RunError(f"kernel {kernel} not found")
    busybox = cache / "busybox" if cache is not None else Path("/bin/busybox")
    if cache is None and not initramfs.is_static_elf(busybox):
        raise RunError("no static busybox: run `pyvmm fetch-kernel` once (it keeps one), or install busybox-static")
    release = initramfs.kernel_release(kernel)
    module_root = None
    if cache is not None and release and (cache / "modules" / "lib" / "modules" / release).is_dir():
        module_root = cache / "modules"
    return KernelAssets(kernel, busybox, module_root, release)


def host_user() -> tuple[int, int, list[int]]:
    """Whom commands run as: the user who ran ``sudo pyvmm run``, else this process's user."""
    if os.getuid() == 0 and os.environ.get("SUDO_UID", "").isdigit() and os.environ.get("SUDO_GID", "").isdigit():
        uid, gid = int(os.environ["SUDO_UID"]), int(os.environ["SUDO_GID"])
        try:
            import pwd

            groups = os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
        except (KeyError, OSError):
            groups = [gid]
        return uid, gid, groups
    return os.getuid(), os.getgid(), os.getgroups()


class CommandVm:
    """A running command VM: ``exec`` commands in it, then ``close`` (also as a context manager)."""

    def __init__(self, vm, workdir: Path, started: float):
        self.vm = vm
        self.workdir = workdir
        self.uds_path = workdir / "vsock"
        #: seconds from the start call to the agent answering
        self.startup_seconds = time.monotonic() - started

    def exec(self, argv, **kwargs):
        return self.vm.exec(argv, **kwargs)

    def close(self) -> None:
        try:
            self.vm.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> CommandVm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prepare(options: RunOptions, workdir: Path) -> dict:
    """Write the command VM's initramfs into ``workdir`` and return its configuration (TOML's shape)."""
    assets = find_assets(options.kernel)
    shares = []
    for i, path in enumerate(options.shares):
        path = Path(path).resolve()
        if not path.is_dir():
            raise RunError(f"--share {path}: not a directory")
        shares.append(initramfs.GuestShare(f"pyvmm-share{i}", str(path), read_only=False))
    image = initramfs.build(assets.busybox, module_root=assets.module_root, kernel_release=assets.release,
                            python=os.path.realpath(sys.executable), agent=str(Path(agent.__file__).resolve()),
                            port=agent.DEFAULT_PORT, ready_port=READY_PORT, writable_root=options.rw,
                            shares=shares, address=options.address if options.tap else None)  # fmt: skip
    (workdir / "initramfs.cpio.gz").write_bytes(image)
    machine = {"vcpus": options.vcpus, "memory_mib": options.memory_mib}
    if options.accel:
        machine["accel"] = options.accel
    config = {
        "machine": machine,
        "boot": {"kernel": str(assets.kernel), "initrd": str(workdir / "initramfs.cpio.gz"), "cmdline": CMDLINE},
        "vsock": {"guest_cid": GUEST_CID, "uds_path": str(workdir / "vsock")},
        "share": [{"path": "/", "tag": initramfs.ROOT_TAG, "read_only": not options.rw}]
        + [{"path": s.path, "tag": s.tag, "read_only": False} for s in shares],
    }
    if options.tap:
        config["net"] = [{"tap": options.tap}]
    return config


def start(options: RunOptions, *, echo=None) -> CommandVm:
    """Boot the command VM and wait for its agent (``RunError`` with the console's tail if it does not come)."""
    from pyvmm.api import VM

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="pyvmm-run-"))
    vm = None
    try:
        config = prepare(options, workdir)
        # The agent calls back on the host's ready port (Firecracker's convention: the guest's
        # connection to CID 2 port P reaches the Unix socket <uds_path>_P), so nothing polls.
        ready = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ready.bind(f"{workdir / 'vsock'}_{READY_PORT}")
        ready.listen(1)
        vm = VM.from_dict(config, base_dir=workdir, echo=echo)
        vm.start()
        log.info("booting %s on %s (%d MiB, %d vCPU(s))", config["boot"]["kernel"], vm.accel, options.memory_mib,
                 options.vcpus)  # fmt: skip
        _wait_ready(vm, ready, options.boot_timeout)
        command_vm = CommandVm(vm, workdir, started)
        log.info("guest agent ready %.2f s after start", command_vm.startup_seconds)
        return command_vm
    except BaseException:
        if vm is not None:
            vm.close()
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _wait_ready(vm, ready: socket.socket, timeout: float) -> None:
    """Accept the agent's ready call; a VM that stops, or a guest too slow, is a ``RunError``."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            status = vm.machine.wait(0)
            if status is not None:
                raise RunError(f"the guest stopped before its agent came up ({status.reason}); console: {vm.console.tail(600)!r}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunError(f"the guest agent did not come up within {timeout:.0f} s; console: {vm.console.tail(600)!r}")
            if select.select([ready], [], [], min(0.1, remaining))[0]:
                conn, _ = ready.accept()
                with conn:
                    conn.settimeout(5)
                    message = conn.recv(64)
                if message == agent.READY:
                    return
                raise RunError(f"the guest's ready call said {message!r}, not {agent.READY!r}")
    finally:
        ready.close()
