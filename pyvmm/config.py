"""The VM configuration: TOML (or a dict) -> typed, validated ``VmConfig``.

Every problem is a ``ConfigError`` naming the file, the key and what is
wrong, in one line. Paths are relative to the config file's folder (or to
``base_dir`` for a dict).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.accel.registry import AUTO_ORDER, NAMES as ACCEL_NAMES
from pyvmm.errors import ConfigError

MIN_MEMORY_MIB = 16
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1"


@dataclass
class MachineConfig:
    vcpus: int = 1
    memory_mib: int = 128
    #: accelerators to try, in order ("auto" expanded)
    accel: list[str] = field(default_factory=lambda: list(AUTO_ORDER))
    #: hand a vCPU to the interpreter when the hypervisor cannot execute an instruction
    fallback: bool = True
    #: "host": what the backend offers; "portable": what every backend of this host can run
    #: (a snapshot then restores on any of them)
    cpu: str = "host"


@dataclass
class BootConfig:
    kernel: Path
    initrd: Path | None = None
    cmdline: str = DEFAULT_CMDLINE


@dataclass
class DriveConfig:
    path: Path
    read_only: bool = False
    serial: str | None = None
    #: lock the image while the VM runs (exclusive when writable, shared when read-only)
    lock: bool = True


@dataclass
class NetConfig:
    tap: str
    mac: str | None = None


@dataclass
class VmConfig:
    machine: MachineConfig
    boot: BootConfig
    drives: list[DriveConfig] = field(default_factory=list)
    nets: list[NetConfig] = field(default_factory=list)
    rng: bool = False
    #: where the config came from, for error messages
    source: str = "<config>"

    @property
    def virtio_device_count(self) -> int:
        return len(self.drives) + len(self.nets) + int(self.rng)


# key -> (expected python types, description for errors)
_SCHEMA = {
    "machine": {
        "vcpus": ((int,), "an integer"),
        "memory_mib": ((int,), "an integer"),
        "accel": ((str, list), 'a string or a list of strings'),
        "fallback": ((bool,), "true or false"),
        "cpu": ((str,), '"host" or "portable"'),
    },
    "boot": {
        "kernel": ((str,), "a path string"),
        "initrd": ((str,), "a path string"),
        "cmdline": ((str,), "a string"),
    },
    "drive": {
        "path": ((str,), "a path string"),
        "read_only": ((bool,), "true or false"),
        "serial": ((str,), "a string"),
        "lock": ((bool,), "true or false"),
    },
    "net": {
        "tap": ((str,), "a string"),
        "mac": ((str,), 'a string like "52:54:00:12:34:56"'),
    },
    "rng": {
        "enabled": ((bool,), "true or false"),
    },
}
#: sections written as arrays of tables ([[drive]])
_ARRAY_SECTIONS = ("drive", "net")
MAX_VIRTIO_DEVICES = 8  # one interrupt line each: IOAPIC GSIs 16-23 (vmm/layout.py)
VIRTIO_BLK_SERIAL_MAX = 20  # bytes in the GET_ID answer
IFNAMSIZ = 16
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def load_config(path: str | os.PathLike) -> VmConfig:
    """Read and validate a TOML config file."""
    path = Path(path)
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as err:
        raise ConfigError("config file not found", file=source) from err
    except PermissionError as err:
        raise ConfigError("config file not readable (permission denied)", file=source) from err
    except IsADirectoryError as err:
        raise ConfigError("is a directory, not a config file", file=source) from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"invalid TOML: {err}", file=source) from err
    except UnicodeDecodeError as err:
        raise ConfigError("not a UTF-8 text file", file=source) from err
    return config_from_dict(data, base_dir=path.parent, source=source)


def config_from_dict(data: dict, *, base_dir: str | os.PathLike = ".", source: str = "<dict>") -> VmConfig:
    """Validate a config given as nested dicts (the TOML structure)."""
    base_dir = Path(base_dir)

    def fail(key, problem):
        raise ConfigError(problem, file=source, key=key)

    if not isinstance(data, dict):
        fail(None, "the configuration must be a table (dict)")
    for table in data:
        if table not in _SCHEMA:
            fail(table, f"unknown section; expected one of: {', '.join(_SCHEMA)}")
        if table in _ARRAY_SECTIONS:
            if not isinstance(data[table], list) or not all(isinstance(t, dict) for t in data[table]):
                fail(table, f"must be an array of tables ([[{table}]])")
            for i, entry in enumerate(data[table]):
                _check_keys(entry, table, f"{table}[{i}]", fail)
        elif not isinstance(data[table], dict):
            fail(table, "must be a table")
        else:
            _check_keys(data[table], table, table, fail)

    machine_data = data.get("machine", {})
    machine = MachineConfig()
    if "vcpus" in machine_data:
        machine.vcpus = machine_data["vcpus"]
        if machine.vcpus < 1:
            fail("machine.vcpus", f"must be at least 1, not {machine.vcpus}")
        if machine.vcpus > 254:
            fail("machine.vcpus", f"{machine.vcpus} is more than the 254 CPUs an xAPIC machine can address")
    if "memory_mib" in machine_data:
        machine.memory_mib = machine_data["memory_mib"]
    if machine.memory_mib < MIN_MEMORY_MIB:
        fail("machine.memory_mib", f"{machine.memory_mib} MiB is below the minimum of {MIN_MEMORY_MIB} MiB")
    host_mib = _host_memory_mib()
    if host_mib is not None and machine.memory_mib > host_mib:
        fail("machine.memory_mib", f"{machine.memory_mib} MiB is more than this host's {host_mib} MiB of RAM")
    if "accel" in machine_data:
        machine.accel = parse_accel(machine_data["accel"], source=source, key="machine.accel")
    if "fallback" in machine_data:
        machine.fallback = machine_data["fallback"]
    if "cpu" in machine_data:
        if machine_data["cpu"] not in ("host", "portable"):
            fail("machine.cpu", f'must be "host" or "portable", not {machine_data["cpu"]!r}')
        machine.cpu = machine_data["cpu"]

    boot_data = data.get("boot")
    if not boot_data or "kernel" not in boot_data:
        fail("boot.kernel", "missing: name the guest kernel (an ELF vmlinux with a PVH note, or a bzImage)")
    kernel = _existing_file(base_dir, boot_data["kernel"], source, "boot.kernel")
    _check_kernel_format(kernel, source)
    initrd = None
    if "initrd" in boot_data:
        initrd = _existing_file(base_dir, boot_data["initrd"], source, "boot.initrd")
    cmdline = boot_data.get("cmdline", DEFAULT_CMDLINE)
    bad = [c for c in cmdline if not (0x20 <= ord(c) < 0x7F)]
    if bad:
        fail("boot.cmdline", f"contains a non-printable or non-ASCII character {bad[0]!r}")
    config = VmConfig(machine=machine, boot=BootConfig(kernel=kernel, initrd=initrd, cmdline=cmdline), source=source)

    for i, entry in enumerate(data.get("drive", [])):
        key = f"drive[{i}]"
        if "path" not in entry:
            fail(f"{key}.path", "missing: name the disk image file")
        drive = DriveConfig(path=_existing_file(base_dir, entry["path"], source, f"{key}.path"))
        drive.read_only = entry.get("read_only", False)
        drive.lock = entry.get("lock", True)
        if not drive.read_only and not os.access(drive.path, os.W_OK):
            fail(f"{key}.path", f"image not writable (permission denied): {_shown(drive.path)}; set read_only = true")
        if "serial" in entry:
            drive.serial = entry["serial"]
            if len(drive.serial.encode()) > VIRTIO_BLK_SERIAL_MAX or not drive.serial.isascii():
                fail(f"{key}.serial", f"must be at most {VIRTIO_BLK_SERIAL_MAX} ASCII characters")
        if any(d.path == drive.path for d in config.drives):
            fail(f"{key}.path", f"{_shown(drive.path)} is already used by another drive")
        config.drives.append(drive)

    for i, entry in enumerate(data.get("net", [])):
        key = f"net[{i}]"
        if "tap" not in entry:
            fail(f"{key}.tap", "missing: name the TAP device (existing, or created when running as root)")
        net = NetConfig(tap=entry["tap"], mac=entry.get("mac"))
        if not net.tap or len(net.tap.encode()) >= IFNAMSIZ or "/" in net.tap or any(c.isspace() for c in net.tap):
            fail(f"{key}.tap", f"{net.tap!r} is not a valid interface name (1-{IFNAMSIZ - 1} characters, no '/' or spaces)")
        if net.mac is not None:
            if not _MAC.match(net.mac):
                fail(f"{key}.mac", f"{net.mac!r} is not a MAC address like 52:54:00:12:34:56")
            if int(net.mac[:2], 16) & 1:
                fail(f"{key}.mac", f"{net.mac} is a multicast address; a NIC needs a unicast one")
        if any(n.tap == net.tap for n in config.nets):
            fail(f"{key}.tap", f"{net.tap} is already used by another net device")
        config.nets.append(net)

    config.rng = data.get("rng", {}).get("enabled", "rng" in data)
    if config.virtio_device_count > MAX_VIRTIO_DEVICES:
        fail("drive", f"{config.virtio_device_count} virtio devices; at most {MAX_VIRTIO_DEVICES} fit the interrupt lines")
    return config


def _check_keys(table: dict, schema: str, where: str, fail) -> None:
    for key, value in table.items():
        if key not in _SCHEMA[schema]:
            fail(f"{where}.{key}", f"unknown key; expected one of: {', '.join(_SCHEMA[schema])}")
        types, description = _SCHEMA[schema][key]
        # bool is an int subclass: `vcpus = true` must not pass as 1
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            fail(f"{where}.{key}", f"must be {description}, not {_toml_type(value)}")


def parse_accel(value, *, source: str = "<command line>", key: str = "machine.accel") -> list[str]:
    """``"auto"``, one name, or a preference list -> the ordered list of names to try."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError('must be "auto", an accelerator name, or a non-empty list of names', file=source, key=key)
    result: list[str] = []
    for name in names:
        if name == "auto":
            expanded = AUTO_ORDER
        elif name in ACCEL_NAMES:
            expanded = (name,)
        else:
            raise ConfigError(
                f"unknown accelerator {name!r}; expected \"auto\" or one of: {', '.join(ACCEL_NAMES)}",
                file=source,
                key=key,
            )
        result.extend(n for n in expanded if n not in result)
    return result


def _existing_file(base_dir: Path, value: str, source: str, key: str) -> Path:
    if not value:
        raise ConfigError("is empty; expected a file path", file=source, key=key)
    if "\0" in value:
        raise ConfigError(f"{value!r} contains a NUL character; file names cannot", file=source, key=key)
    try:
        path = (base_dir / os.path.expanduser(value)).resolve()
        exists, regular, readable = path.exists(), path.is_file(), os.access(path, os.R_OK)
    except (OSError, RuntimeError) as err:  # a name too long, a symlink loop, ...
        why = getattr(err, "strerror", None) or str(err)
        raise ConfigError(f"cannot use {value!r} as a file path: {why}", file=source, key=key) from err
    if not exists:
        raise ConfigError(f"file not found: {_shown(path)}", file=source, key=key)
    if not regular:
        raise ConfigError(f"not a regular file: {_shown(path)}", file=source, key=key)
    if not readable:
        raise ConfigError(f"file not readable (permission denied): {_shown(path)}", file=source, key=key)
    return path


def _shown(path) -> str:
    """A path as an error message shows it: as is, or quoted with escapes when it holds control characters."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _check_kernel_format(path: Path, source: str) -> None:
    """A cheap sniff so a wrong file is named at config time; the loader checks the rest."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x210)
    except OSError as err:
        raise ConfigError(f"cannot read {_shown(path)}: {err.strerror}", file=source, key="boot.kernel") from err
    if head[:4] == b"\x7fELF":
        return
    if len(head) >= 0x206 and head[0x1FE:0x200] == b"\x55\xaa" and head[0x202:0x206] == b"HdrS":
        return
    raise ConfigError(f"{_shown(path)} is neither an ELF vmlinux nor a bzImage", file=source, key="boot.kernel")


def _host_memory_mib() -> int | None:
    try:
        import psutil
    except ImportError:  # psutil is a dependency; a broken install just skips this check
        return None
    return psutil.virtual_memory().total >> 20


def _toml_type(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}.get(
        type(value), type(value).__name__
    )
