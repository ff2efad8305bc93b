"""The initramfs of a ``pyvmm run`` guest, made on the fly: busybox, the drivers it needs, a small init.

The init loads the drivers (virtio-mmio, virtio-fs, vsock, overlay) in dependency
order, mounts the host root from the virtio-fs share (read-only unless asked),
gives the guest a tmpfs /run, and on a read-only root makes /tmp and /var/tmp
writable overlays (the host's files under a tmpfs upper layer: a command started
in a directory below /tmp finds it, and writes stay in the guest). It mounts the
extra shares at their host paths and switches to the host root to run pyvmm's
guest agent with the host's Python.
Anything that fails is printed on the console (``pyvmm-init: ...``) and the VM
powers off, so the host reports it instead of waiting.
"""

from __future__ import annotations

import gzip
import re
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path

from pyvmm.errors import PyvmmError
from pyvmm.run.cpio import Cpio

#: drivers the guest needs (their dependencies come from modules.dep)
RUN_MODULES = (
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/fs/fuse/virtiofs.ko",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
    "kernel/fs/overlayfs/overlay.ko",
)
ROOT_TAG = "pyvmm-root"
#: the guest's own, empty: what runs on the host keeps its sockets and pid files here
TMPFS_DIRS = ("/run",)
#: on a read-only root: the host's files with the guest's writes on top (a tmpfs upper layer)
OVERLAY_DIRS = ("/tmp", "/var/tmp")
BUSYBOX_APPLETS = ("sh", "mount", "insmod", "mkdir", "chmod", "switch_root", "echo", "cat", "poweroff", "sleep", "ip")
#: the NIC's driver, loaded when the VM has one
NET_MODULES = ("kernel/drivers/net/virtio_net.ko",)


class InitramfsError(PyvmmError):
    """The guest image cannot be made; the message names the file or module missing."""


@dataclass(frozen=True)
class GuestShare:
    tag: str
    #: where the guest mounts it (the host path, so commands see the same paths)
    path: str
    read_only: bool


def modules_in_load_order(moddir: Path, wanted=RUN_MODULES) -> list[str]:
    """``wanted`` and their dependencies (paths below ``moddir``), each after what it depends on."""
    deps: dict[str, list[str]] = {}
    dep_file = moddir / "modules.dep"
    if not dep_file.is_file():
        raise InitramfsError(f"{dep_file} is missing (the module tree has not been through depmod)")
    for line in dep_file.read_text().splitlines():
        if ":" in line:
            module, rest = line.split(":", 1)
            deps[module.strip()] = rest.split()
    builtin = set((moddir / "modules.builtin").read_text().split()) if (moddir / "modules.builtin").is_file() else set()
    order: list[str] = []

    def visit(module: str, chain: tuple[str, ...]) -> None:
        if module in order or module in builtin:
            return
        if module in chain:
            raise InitramfsError(f"{dep_file}: a dependency loop through {module}")
        if module not in deps:
            raise InitramfsError(f"{moddir} has no {module} (and the kernel does not have it built in)")
        for dependency in deps[module]:
            visit(dependency, (*chain, module))
        order.append(module)

    for module in wanted:
        visit(module, ())
    return order


def init_script(*, modules: list[str], python: str, agent: str, port: int, ready_port: int, writable_root: bool,
                shares: list[GuestShare], address: str | None = None) -> str:  # fmt: skip
    """``address``: an IPv4 address with its prefix length for the first NIC (eth0), if the VM has one."""
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        "# pyvmm run: load the drivers, mount the host root, start the guest agent",
        "export PATH=/bin",
        'fail() { echo "pyvmm-init: $*"; sleep 1; poweroff -f; }',
        "mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t devtmpfs devtmpfs /dev || fail 'cannot mount /proc, /sys, /dev'",
    ]
    for module in modules:
        lines.append(f"insmod /lib/modules/{q(module)} || fail {q('cannot load ' + module)}")
    if address is not None:
        lines.append(f"ip link set eth0 up && ip addr add {q(address)} dev eth0 || fail 'cannot configure eth0'")
    mode = "rw" if writable_root else "ro"
    lines += [
        "mkdir -p /newroot",
        f"mount -t virtiofs -o {mode} {ROOT_TAG} /newroot || fail 'cannot mount the host root (virtio-fs tag {ROOT_TAG})'",
    ]
    for directory in TMPFS_DIRS:
        lines.append(f"[ -d /newroot{directory} ] && mount -t tmpfs -o mode=755 tmpfs /newroot{directory}")
    if not writable_root:
        for directory in OVERLAY_DIRS:
            layer = "/newroot/run/pyvmm-overlay" + directory.replace("/", "-")
            lines.append(f"[ -d /newroot{directory} ] && mkdir -p {layer}/upper {layer}/work && chmod 1777 {layer}/upper && "
                         f"mount -t overlay overlay -o lowerdir=/newroot{directory},upperdir={layer}/upper,"
                         f"workdir={layer}/work /newroot{directory} || fail 'cannot make {directory} writable'")  # fmt: skip
    for share in shares:
        target = q("/newroot" + share.path)
        lines.append(f"mount -t virtiofs -o {'ro' if share.read_only else 'rw'} {q(share.tag)} {target} "
                     f"|| fail {q('cannot mount ' + share.path)}")  # fmt: skip
    for fs in ("proc", "sys", "dev"):
        lines.append(f"mount --move /{fs} /newroot/{fs} || fail 'cannot move /{fs}'")
    # -I -S: no site-packages scan, no environment: the agent needs only the standard library, and
    # every file Python looks at is a virtio-fs round trip
    lines.append(f"exec switch_root /newroot {q(python)} -I -S {q(agent)} --port {port} --ready-port {ready_port}")
    lines.append("fail 'switch_root failed'")
    return "\n".join(lines) + "\n"


def build(busybox: Path, *, module_root: Path | None, kernel_release: str | None, python: str, agent: str, port: int,
          ready_port: int, writable_root: bool = False, shares: list[GuestShare] = (), address: str | None = None) -> bytes:  # fmt: skip
    """The gzip'd cpio. ``module_root``/``kernel_release``: a tree holding lib/modules/<release>/
    for the kernel that boots (None: the drivers are built into it). ``address``: see init_script."""
    if not busybox.is_file():
        raise InitramfsError(f"busybox not found at {busybox} (pyvmm fetch-kernel puts a static one in its cache)")
    if not is_static_elf(busybox):
        raise InitramfsError(f"{busybox} is not a static busybox (the guest has no C library before the root is mounted)")
    cpio = Cpio()
    for directory in ("bin", "dev", "proc", "sys", "lib/modules", "newroot"):
        cpio.dir(directory)
    cpio.chardev("dev/console", 5, 1, 0o600)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in BUSYBOX_APPLETS:
        cpio.symlink(f"bin/{applet}", "busybox")
    modules: list[str] = []
    if module_root is not None and kernel_release:
        moddir = module_root / "lib" / "modules" / kernel_release
        modules = modules_in_load_order(moddir, RUN_MODULES + (NET_MODULES if address else ()))
        for module in modules:
            cpio.file(f"lib/modules/{module}", (moddir / module).read_bytes())
    cpio.file("init", init_script(modules=modules, python=python, agent=agent, port=port, ready_port=ready_port,
                                  writable_root=writable_root, shares=list(shares), address=address).encode(),
              0o755)  # fmt: skip
    return gzip.compress(cpio.finish(), compresslevel=1, mtime=0)


_RELEASE = re.compile(rb"Linux version (\S+) ")


def kernel_release(kernel: Path) -> str | None:
    """The release (``uname -r``) of a bzImage (its header's version string) or an ELF vmlinux."""
    try:
        with open(kernel, "rb") as f:
            head = f.read(0x1000)
            if head[0x202:0x206] == b"HdrS":  # bzImage: setup header, kernel_version at 0x20E (+0x200)
                offset = int.from_bytes(head[0x20E:0x210], "little") + 0x200
                f.seek(offset)
                text = f.read(256).split(b"\0")[0]
                return text.split()[0].decode(errors="replace") if text else None
            f.seek(0)
            data = f.read()
    except OSError as err:
        raise InitramfsError(f"cannot read the kernel {kernel}: {err.strerror}") from err
    match = _RELEASE.search(data)
    return match.group(1).decode(errors="replace") if match else None


def is_static_elf(path: Path) -> bool:
    """No PT_INTERP: the binary needs no dynamic loader."""
    try:
        data = path.read_bytes()[:65536]
    except OSError:
        return False
    if not data.startswith(b"\x7fELF") or data[4] != 2:
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize, phnum = int.from_bytes(data[0x36:0x38], "little"), int.from_bytes(data[0x38:0x3A], "little")
    for i in range(phnum):
        at = phoff + i * phentsize
        if int.from_bytes(data[at : at + 4], "little") == 3:  # PT_INTERP
            return False
    return stat.S_ISREG(path.stat().st_mode)
