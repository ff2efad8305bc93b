"""Firecracker's configuration objects (its API bodies and ``--config-file`` JSON) -> a pyvmm ``VmConfig``.

The shapes are Firecracker's (src/firecracker/swagger/firecracker.yaml, v1.x):
``machine-config``, ``boot-source``, ``drives``, ``network-interfaces``,
``entropy``, ``logger``, ``metrics``. Each body is checked field by field; a
problem is a ``FaultError`` naming the object and the field, which the API
answers as 400 ``{"fault_message": ...}``. Fields that have no meaning in pyvmm
are accepted and logged once (cache_type, io_engine, ...) or refused with a 400 when
accepting them would mislead (a CPU template, SMT, huge pages, vhost-user
drives): ``ACCEPTED_NOT_APPLIED`` and ``REFUSED`` list them, and the README
repeats the lists.

The pre-boot state is kept as Firecracker's JSON objects and turned into pyvmm's
TOML structure at ``InstanceStart``, so pyvmm's own validation (files exist and
are readable, images writable, the kernel's format) runs on it too.
"""

from __future__ import annotations

import copy
import logging
import re

from pyvmm.devices.ratelimit import RateLimiterConfig, RateLimiterError
from pyvmm.errors import ConfigError, PyvmmError

log = logging.getLogger("pyvmm.firecracker")

FIRECRACKER_VERSION = "1.7.0"  # the API version whose shapes this follows
ROOT_DRIVE_NAME = "/dev/vda"


class FaultError(PyvmmError):
    """A request Firecracker's API would refuse with 400; ``str()`` is the fault message."""


_ID = re.compile(r"^[a-zA-Z0-9_]{1,64}$")

# field -> (python types, description); "required" is a set per object
SCHEMAS: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    "machine-config": {
        "vcpu_count": ((int,), "an integer (1-32)"),
        "mem_size_mib": ((int,), "an integer"),
        "smt": ((bool,), "a boolean"),
        "track_dirty_pages": ((bool,), "a boolean"),
        "cpu_template": ((str,), "a string"),
        "huge_pages": ((str,), "a string"),
    },
    "boot-source": {
        "kernel_image_path": ((str,), "a path string"),
        "initrd_path": ((str, type(None)), "a path string"),
        "boot_args": ((str, type(None)), "a string"),
    },
    "drive": {
        "drive_id": ((str,), "a string"),
        "path_on_host": ((str,), "a path string"),
        "is_root_device": ((bool,), "a boolean"),
        "is_read_only": ((bool,), "a boolean"),
        "partuuid": ((str, type(None)), "a string"),
        "cache_type": ((str,), '"Unsafe" or "Writeback"'),
        "io_engine": ((str,), '"Sync" or "Async"'),
        "rate_limiter": ((dict, type(None)), "a rate limiter object"),
        "socket": ((str,), "a path string"),
    },
    "network-interface": {
        "iface_id": ((str,), "a string"),
        "host_dev_name": ((str,), "a string"),
        "guest_mac": ((str,), 'a MAC address like "06:00:AC:10:00:02"'),
        "rx_rate_limiter": ((dict, type(None)), "a rate limiter object"),
        "tx_rate_limiter": ((dict, type(None)), "a rate limiter object"),
    },
    "entropy": {"rate_limiter": ((dict, type(None)), "a rate limiter object")},
    # pyvmm's own (under /pyvmm/): the interpreter's coverage and traces, on and off at run time
    "coverage": {"state": ((str,), '"On" or "Off"'), "path": ((str,), "a path string")},
    "trace": {"state": ((str,), '"On" or "Off"'), "path": ((str,), "a path string"),
              "limit_mib": ((int,), "an integer (1 to 1048576)")},
    "vsock": {
        "guest_cid": ((int,), "an integer (3 to 4294967294)"),
        "uds_path": ((str,), "a path string"),
        "vsock_id": ((str,), "a string (deprecated; ignored)"),
    },
    "balloon": {
        "amount_mib": ((int,), "an integer (MiB)"),
        "deflate_on_oom": ((bool,), "a boolean"),
        "stats_polling_interval_s": ((int,), "an integer (seconds)"),
        "free_page_hinting": ((bool,), "a boolean"),
        "free_page_reporting": ((bool,), "a boolean"),
    },
    "balloon-update": {"amount_mib": ((int,), "an integer (MiB)")},
    "balloon-stats-update": {"stats_polling_interval_s": ((int,), "an integer (seconds)")},
    "logger": {
        "log_path": ((str,), "a path string"),
        "level": ((str,), '"Error", "Warning", "Info", "Debug", "Trace" or "Off"'),
        "show_level": ((bool,), "a boolean"),
        "show_log_origin": ((bool,), "a boolean"),
        "module": ((str,), "a string"),
    },
    "metrics": {"metrics_path": ((str,), "a path string")},
    "snapshot-create": {
        "snapshot_type": ((str,), '"Full" or "Diff"'),
        "snapshot_path": ((str,), "a path string"),
        "mem_file_path": ((str,), "a path string"),
        "version": ((str,), "a string"),
    },
    "snapshot-load": {
        "snapshot_path": ((str,), "a path string"),
        "mem_file_path": ((str,), "a path string"),
        "mem_backend": ((dict,), "a memory backend object"),
        "enable_diff_snapshots": ((bool,), "a boolean"),
        "track_dirty_pages": ((bool,), "a boolean"),
        "resume_vm": ((bool,), "a boolean"),
    },
    "mem_backend": {"backend_type": ((str,), '"File"'), "backend_path": ((str,), "a path string")},
}
REQUIRED = {
    "coverage": {"state"},
    "trace": {"state"},
    "vsock": {"guest_cid", "uds_path"},
    "machine-config": {"vcpu_count", "mem_size_mib"},
    "boot-source": {"kernel_image_path"},
    "drive": {"drive_id", "is_root_device"},
    "network-interface": {"iface_id", "host_dev_name"},
    "balloon": {"amount_mib", "deflate_on_oom"},
    "balloon-update": {"amount_mib"},
    "balloon-stats-update": {"stats_polling_interval_s"},
    "metrics": {"metrics_path"},
    "snapshot-create": {"snapshot_path", "mem_file_path"},
    "snapshot-load": {"snapshot_path"},
    "mem_backend": {"backend_type", "backend_path"},
}
#: what a PATCH may change
PATCHABLE = {
    "machine-config": set(SCHEMAS["machine-config"]),
    "drive": {"drive_id", "path_on_host", "rate_limiter"},
    "network-interface": {"iface_id", "rx_rate_limiter", "tx_rate_limiter"},
}
#: accepted and logged once: they change nothing in pyvmm
ACCEPTED_NOT_APPLIED = ("cache_type", "io_engine", "partuuid", "show_level", "show_log_origin", "module",
                        "vsock_id")  # fmt: skip
#: refused with 400 (field: why), unless set to the value that means "off"
REFUSED = {
    "cpu_template": ("None", "CPU templates are not supported: pyvmm presents its own CPUID policy"),
    "smt": (False, "SMT (2 threads per core) is not supported"),
    "huge_pages": ("None", "huge pages are not supported"),
    "socket": (None, "vhost-user block devices are not supported"),
    "free_page_hinting": (False, "balloon free page hinting is not supported"),
    "free_page_reporting": (False, "balloon free page reporting is not supported"),
}
LOG_LEVELS = {"Error": "ERROR", "Warning": "WARNING", "Info": "INFO", "Debug": "DEBUG", "Trace": "DEBUG", "Off": None}
_logged_once: set[str] = set()


def check_body(kind: str, body, *, patch: bool = False) -> dict:
    """``body`` as a dict of known, well-typed fields of object ``kind``; else ``FaultError``."""
    if not isinstance(body, dict):
        raise FaultError(f"{kind}: the body must be a JSON object")
    schema = SCHEMAS[kind]
    allowed = PATCHABLE.get(kind, set(schema)) if patch else set(schema)
    for key, value in body.items():
        if key not in schema:
            raise FaultError(f"{kind}: unknown field '{key}'; expected one of: {', '.join(schema)}")
        if key not in allowed:
            raise FaultError(f"{kind}: field '{key}' cannot be changed by PATCH; PATCH takes {', '.join(sorted(allowed))}")
        types, description = schema[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise FaultError(f"{kind}: field '{key}' must be {description}, not {_json_type(value)}")
    _check_paths(kind, body)
    for key, value in body.items():
        if key.endswith("rate_limiter") and value is not None:
            try:
                RateLimiterConfig.from_dict(value)
            except RateLimiterError as err:
                raise FaultError(f"{kind}: field '{'.'.join(filter(None, (key, err.key)))}' {err.problem}") from err
    if not patch:
        missing = sorted(REQUIRED.get(kind, set()) - set(body))
        if missing:
            raise FaultError(f"{kind}: missing required field '{missing[0]}'")
    for key, value in body.items():
        if key in REFUSED and value != REFUSED[key][0]:
            raise FaultError(f"{kind}: field '{key}' = {value!r}: {REFUSED[key][1]}")
        if key in ACCEPTED_NOT_APPLIED and value not in (None, False) and key not in _logged_once:
            _logged_once.add(key)
            log.info("%s: field '%s' is accepted but has no effect in pyvmm", kind, key)
    return body


def _check_paths(kind: str, body: dict) -> None:
    """A file name cannot hold a NUL; an empty one names nothing."""
    for key, value in body.items():
        if (key.endswith("_path") or key == "path_on_host" or key == "backend_path") and isinstance(value, str):
            if "\0" in value:
                raise FaultError(f"{kind}: field '{key}' contains a NUL character; file names cannot")
            if not value:
                raise FaultError(f"{kind}: field '{key}' is empty; expected a file path")


def _json_type(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)  # fmt: skip


class FirecrackerConfig:
    """The pre-boot configuration as Firecracker's objects, and its conversion to pyvmm's."""

    def __init__(self):
        self.machine = {"vcpu_count": 1, "mem_size_mib": 128, "smt": False, "track_dirty_pages": False}
        self.boot: dict | None = None
        self.drives: dict[str, dict] = {}
        self.nets: dict[str, dict] = {}
        self.entropy: dict | None = None
        self.balloon: dict | None = None
        self.vsock: dict | None = None
        self.logger: dict | None = None
        self.metrics: dict | None = None

    # --- the objects -----------------------------------------------------------------
    def put_machine_config(self, body, *, patch: bool = False) -> None:
        body = check_body("machine-config", body, patch=patch)
        if "vcpu_count" in body and not 1 <= body["vcpu_count"] <= 32:
            raise FaultError(f"machine-config: field 'vcpu_count' must be between 1 and 32, not {body['vcpu_count']}")
        if "mem_size_mib" in body and body["mem_size_mib"] < 1:
            raise FaultError(f"machine-config: field 'mem_size_mib' must be positive, not {body['mem_size_mib']}")
        self.machine = {**self.machine, **body} if patch else {"smt": False, "track_dirty_pages": False, **body}

    def put_boot_source(self, body) -> None:
        self.boot = dict(check_body("boot-source", body))

    def put_drive(self, drive_id: str, body, *, patch: bool = False) -> None:
        body = check_body("drive", body, patch=patch)
        self._check_id("drive", "drive_id", drive_id, body)
        if patch:
            if drive_id not in self.drives:
                raise FaultError(f"drive '{drive_id}' does not exist; PUT /drives/{drive_id} first")
            self.drives[drive_id] = self.patched(self.drives[drive_id], body)
            return
        if "path_on_host" not in body:
            raise FaultError("drive: missing required field 'path_on_host'")
        if body["is_root_device"] and any(d["is_root_device"] for i, d in self.drives.items() if i != drive_id):
            raise FaultError(f"drive '{drive_id}': a root device is already configured")
        self.drives[drive_id] = {"is_read_only": False, **body}

    def put_network_interface(self, iface_id: str, body, *, patch: bool = False) -> None:
        body = check_body("network-interface", body, patch=patch)
        self._check_id("network-interface", "iface_id", iface_id, body)
        if patch:
            if iface_id not in self.nets:
                raise FaultError(f"network interface '{iface_id}' does not exist")
            self.nets[iface_id] = self.patched(self.nets[iface_id], body)
            return
        self.nets[iface_id] = dict(body)

    def put_entropy(self, body) -> None:
        self.entropy = dict(check_body("entropy", body))

    def put_vsock(self, body) -> None:
        from pyvmm.config import VSOCK_MAX_CID, VSOCK_MIN_CID

        body = check_body("vsock", body)
        if not VSOCK_MIN_CID <= body["guest_cid"] <= VSOCK_MAX_CID:
            raise FaultError(f"vsock: field 'guest_cid' must be between {VSOCK_MIN_CID} and {VSOCK_MAX_CID}, "
                             f"not {body['guest_cid']}")  # fmt: skip
        self.vsock = dict(body)

    def put_balloon(self, body) -> None:
        body = check_body("balloon", body)
        self._check_balloon_fields(body)
        self.balloon = {"stats_polling_interval_s": 0, **body}

    def patch_balloon(self, body) -> None:
        """PATCH /balloon before boot (after boot the VM takes the new target too: routes.py)."""
        body = check_body("balloon-update", body)
        if self.balloon is None:
            raise FaultError("balloon: no balloon device is configured (PUT /balloon first)")
        self._check_balloon_fields(body)
        self.balloon.update(body)

    def patch_balloon_statistics(self, body, *, started: bool) -> None:
        body = check_body("balloon-stats-update", body)
        if self.balloon is None:
            raise FaultError("balloon: no balloon device is configured (PUT /balloon first)")
        self._check_balloon_fields(body)
        was_on, on = self.balloon["stats_polling_interval_s"] > 0, body["stats_polling_interval_s"] > 0
        if started and was_on != on:
            raise FaultError(f"balloon: statistics cannot be turned {'on' if on else 'off'} after the microVM started")
        self.balloon.update(body)

    def _check_balloon_fields(self, body: dict) -> None:
        from pyvmm.config import MAX_STATS_INTERVAL_S

        if "amount_mib" in body and not 0 <= body["amount_mib"] <= self.machine["mem_size_mib"]:
            raise FaultError(f"balloon: field 'amount_mib' {body['amount_mib']} must be between 0 and the guest's "
                             f"{self.machine['mem_size_mib']} MiB")  # fmt: skip
        if not 0 <= body.get("stats_polling_interval_s", 0) <= MAX_STATS_INTERVAL_S:
            raise FaultError(f"balloon: field 'stats_polling_interval_s' must be between 0 and {MAX_STATS_INTERVAL_S}, "
                             f"not {body['stats_polling_interval_s']}")  # fmt: skip

    def put_logger(self, body) -> None:
        body = check_body("logger", body)
        if "level" in body and body["level"] not in LOG_LEVELS:
            raise FaultError(f"logger: field 'level' must be one of {', '.join(LOG_LEVELS)}, not {body['level']!r}")
        self.logger = dict(body)

    def put_metrics(self, body) -> None:
        self.metrics = dict(check_body("metrics", body))

    @staticmethod
    def patched(current: dict, body: dict) -> dict:
        """``current`` with a PATCH ``body`` applied; rate limiters merge bucket by bucket, as Firecracker's."""
        out = {**current, **body}
        for key in ("rate_limiter", "rx_rate_limiter", "tx_rate_limiter"):
            if key in body:
                out[key] = merged_rate_limiter(current.get(key), body[key])
        return out

    @staticmethod
    def _check_id(kind: str, field: str, path_id: str, body: dict) -> None:
        if not _ID.match(path_id):
            raise FaultError(f"{kind}: id {path_id!r} must be 1-64 letters, digits or underscores")
        if field in body and body[field] != path_id:
            raise FaultError(f"{kind}: the body's {field} {body[field]!r} differs from the path's {path_id!r}")

    # --- Firecracker's config file ----------------------------------------------------------
    @classmethod
    def from_json(cls, data) -> FirecrackerConfig:
        """Firecracker's ``--config-file`` JSON (the objects under their API names)."""
        if not isinstance(data, dict):
            raise FaultError("the configuration must be a JSON object")
        known = ("boot-source", "drives", "machine-config", "network-interfaces", "entropy", "logger", "metrics",
                 "balloon", "vsock", "mmds-config", "cpu-config")  # fmt: skip
        config = cls()
        for key, value in data.items():
            if key not in known:
                raise FaultError(f"unknown configuration key '{key}'; expected one of: {', '.join(known)}")
            if key in ("mmds-config", "cpu-config") and value is not None:
                raise FaultError(f"'{key}' is not supported by pyvmm yet")
        if "machine-config" in data:
            config.put_machine_config(data["machine-config"])
        if "boot-source" in data:
            config.put_boot_source(data["boot-source"])
        for i, drive in enumerate(_list(data, "drives")):
            config.put_drive(_item_id(drive, "drive_id", f"drives[{i}]"), drive)
        for i, net in enumerate(_list(data, "network-interfaces")):
            config.put_network_interface(_item_id(net, "iface_id", f"network-interfaces[{i}]"), net)
        if data.get("entropy") is not None:
            config.put_entropy(data["entropy"])
        if data.get("balloon") is not None:
            config.put_balloon(data["balloon"])
        if data.get("vsock") is not None:
            config.put_vsock(data["vsock"])
        if data.get("logger") is not None:
            config.put_logger(data["logger"])
        if data.get("metrics") is not None:
            config.put_metrics(data["metrics"])
        return config

    @classmethod
    def from_vm_config(cls, config) -> FirecrackerConfig:
        """A pyvmm ``VmConfig`` (a TOML-configured VM) in Firecracker's shapes, for ``GET /vm/config``."""
        out = cls()
        out.machine = {"vcpu_count": config.machine.vcpus, "mem_size_mib": config.machine.memory_mib, "smt": False,
                       "track_dirty_pages": config.machine.track_dirty_pages}  # fmt: skip
        out.boot = {"kernel_image_path": str(config.boot.kernel), "boot_args": config.boot.cmdline,
                    "initrd_path": str(config.boot.initrd) if config.boot.initrd else None}  # fmt: skip
        for i, drive in enumerate(config.drives):
            out.drives[f"drive{i}"] = {"drive_id": f"drive{i}", "path_on_host": str(drive.path), "is_root_device": False,
                                       "is_read_only": drive.read_only, **_limiters(drive, "rate_limiter")}  # fmt: skip
        for i, net in enumerate(config.nets):
            out.nets[f"net{i}"] = {"iface_id": f"net{i}", "host_dev_name": net.tap,
                                   **({"guest_mac": net.mac} if net.mac else {}),
                                   **_limiters(net, "rx_rate_limiter", "tx_rate_limiter")}  # fmt: skip
        if config.rng:
            out.entropy = {"rate_limiter": config.rng_rate_limiter.as_dict()} if config.rng_rate_limiter else {}
        if config.vsock is not None:
            out.vsock = {"guest_cid": config.vsock.guest_cid, "uds_path": str(config.vsock.uds_path)}
        if config.balloon is not None:
            out.balloon = {"amount_mib": config.balloon.amount_mib, "deflate_on_oom": config.balloon.deflate_on_oom,
                           "stats_polling_interval_s": config.balloon.stats_polling_interval_s}  # fmt: skip
        return out

    def as_json(self) -> dict:
        """``GET /vm/config``: Firecracker's FullVmConfiguration."""
        return {
            "balloon": copy.deepcopy(self.balloon),
            "drives": [copy.deepcopy(d) for d in self.ordered_drives()],
            "boot-source": copy.deepcopy(self.boot) if self.boot else None,
            "cpu-config": None,
            "logger": copy.deepcopy(self.logger),
            "machine-config": dict(self.machine),
            "metrics": copy.deepcopy(self.metrics),
            "mmds-config": None,
            "network-interfaces": [copy.deepcopy(n) for n in self.nets.values()],
            "vsock": copy.deepcopy(self.vsock),
            "entropy": copy.deepcopy(self.entropy),
        }

    def ordered_drives(self) -> list[dict]:
        """The root device first (it becomes /dev/vda, as in Firecracker), then the order of PUTs."""
        drives = list(self.drives.values())
        return sorted(drives, key=lambda d: not d["is_root_device"])

    # --- to pyvmm -----------------------------------------------------------------------------
    def to_pyvmm(self, accel: list[str] | None = None, cpu: str = "host") -> dict:
        """pyvmm's TOML structure (a dict for ``config_from_dict``)."""
        if self.boot is None:
            raise FaultError("cannot start the microVM: no boot source (PUT /boot-source first)")
        cmdline = self.boot.get("boot_args") or "console=ttyS0 reboot=k panic=1 pci=off"
        drives = self.ordered_drives()
        root = next((d for d in drives if d["is_root_device"]), None)
        if root is not None:
            cmdline += f" root={ROOT_DRIVE_NAME} {'ro' if root['is_read_only'] else 'rw'}"
        data: dict = {
            "machine": {"vcpus": self.machine["vcpu_count"], "memory_mib": self.machine["mem_size_mib"],
                        "track_dirty_pages": bool(self.machine.get("track_dirty_pages", False))},
            "boot": {"kernel": self.boot["kernel_image_path"], "cmdline": cmdline},
        }
        if accel:
            data["machine"]["accel"] = accel
        data["machine"]["cpu"] = cpu
        if self.boot.get("initrd_path"):
            data["boot"]["initrd"] = self.boot["initrd_path"]
        if drives:
            data["drive"] = [{"path": d["path_on_host"], "read_only": d["is_read_only"], **_present(d, "rate_limiter")}
                             for d in drives]  # fmt: skip
        if self.nets:
            data["net"] = [{"tap": n["host_dev_name"], **({"mac": n["guest_mac"]} if "guest_mac" in n else {}),
                            **_present(n, "rx_rate_limiter", "tx_rate_limiter")} for n in self.nets.values()]  # fmt: skip
        if self.entropy is not None:
            data["rng"] = {"enabled": True, **_present(self.entropy, "rate_limiter")}
        if self.balloon is not None:
            data["balloon"] = {key: self.balloon[key] for key in ("amount_mib", "deflate_on_oom", "stats_polling_interval_s")}
        if self.vsock is not None:
            data["vsock"] = {"guest_cid": self.vsock["guest_cid"], "uds_path": self.vsock["uds_path"]}
        return data

    def to_vm_config(self, accel: list[str] | None = None, cpu: str = "host"):
        from pyvmm.config import config_from_dict

        try:
            return config_from_dict(self.to_pyvmm(accel, cpu), source="the microVM's configuration")
        except ConfigError as err:
            raise FaultError(_firecracker_key(str(err))) from err


def _firecracker_key(message: str) -> str:
    """pyvmm's config keys in an error, named as Firecracker's fields."""
    for ours, theirs in (("boot.kernel", "boot-source.kernel_image_path"), ("boot.initrd", "boot-source.initrd_path"),
                         ("boot.cmdline", "boot-source.boot_args"), ("machine.vcpus", "machine-config.vcpu_count"),
                         ("machine.memory_mib", "machine-config.mem_size_mib"), ("drive[", "drives["),
                         (".path", ".path_on_host"), ("net[", "network-interfaces["), (".tap", ".host_dev_name"),
                         (".mac", ".guest_mac")):  # fmt: skip
        message = message.replace(ours, theirs)
    return message


def _limiters(config, *names: str) -> dict:
    """A pyvmm config object's rate limiters that are set, in Firecracker's shape."""
    return {name: getattr(config, name).as_dict() for name in names if getattr(config, name) is not None}


def _present(body: dict, *names: str) -> dict:
    """The fields of a Firecracker object that are given and not null."""
    return {name: body[name] for name in names if body.get(name) is not None}


def merged_rate_limiter(old: dict | None, update: dict | None) -> dict | None:
    """Firecracker's PATCH of a rate limiter: the buckets ``update`` names replace the old ones, the others stay."""
    if update is None:
        return old
    return RateLimiterConfig.from_dict(old or {}).updated(update).as_dict()


def _list(data: dict, key: str) -> list:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise FaultError(f"'{key}' must be an array")
    return value


def _item_id(item, field: str, where: str) -> str:
    if not isinstance(item, dict) or not isinstance(item.get(field), str):
        raise FaultError(f"{where}: missing required field '{field}'")
    return item[field]
