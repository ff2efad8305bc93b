"""Firecracker's REST API over one VM, sans-IO: ``handle(method, path, body) -> Response``.

The HTTP layer (``server/http.py``) only parses and writes; everything a request
means is here and testable without a socket. Requests are served one at a time,
as Firecracker's API thread does. The rules are Firecracker's: configuration
objects may be PUT only before ``InstanceStart`` ("not supported after starting
the microVM"), ``PATCH /vm`` and the post-boot actions only after it; success is
204 with no body (GETs: 200 with JSON); every refusal is 400 with
``{"fault_message": "..."}`` naming the object and the field.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass

from pyvmm import __version__
from pyvmm.devices.ratelimit import RateLimiterConfig
from pyvmm.errors import PyvmmError, one_line
from pyvmm.server.firecracker import FIRECRACKER_VERSION, LOG_LEVELS, FaultError, FirecrackerConfig, check_body
from pyvmm.vmm.states import VmState

log = logging.getLogger("pyvmm.api")

NOT_AFTER_BOOT = "The requested operation is not supported after starting the microVM."
NOT_BEFORE_BOOT = "The requested operation is not supported before starting the microVM."
ACTIONS = ("InstanceStart", "SendCtrlAltDel", "FlushMetrics")


@dataclass(frozen=True)
class Response:
    status: int
    body: dict | None = None
    #: for 405: the methods the path takes (the Allow header)
    allow: tuple[str, ...] = ()

    def encoded(self) -> bytes:
        return b"" if self.body is None else json.dumps(self.body).encode()


def fault(message: str) -> Response:
    return Response(400, {"fault_message": message})


class FirecrackerApi:
    """One microVM's API. ``start_vm(vm_config)`` is given the pyvmm config at InstanceStart and
    returns the started ``pyvmm.api.VM`` (the process decides where its console goes)."""

    def __init__(self, start_vm, *, instance_id: str = "anonymous-instance", accel: list[str] | None = None,
                 restore_vm=None, cpu: str = "host"):  # fmt: skip
        self.config = FirecrackerConfig()
        self.cpu = cpu
        self.start_vm = start_vm
        #: ``restore_vm(snapshot_path, mem_path, resume, track_dirty_pages)`` -> the restored VM
        #: (PUT /snapshot/load; ``track_dirty_pages`` None: as the snapshotted VM had it)
        self.restore_vm = restore_vm or self._no_restore
        self.instance_id = instance_id
        self.accel = accel
        self.vm = None
        self.metrics = None
        self._log_handler: logging.Handler | None = None
        self._lock = threading.Lock()
        self.started = threading.Event()

    @classmethod
    def for_vm(cls, vm, *, instance_id: str = "anonymous-instance") -> FirecrackerApi:
        """The API of a VM configured and started by pyvmm itself (``pyvmm boot --api-sock``)."""

        def refuse(_config):
            raise FaultError(NOT_AFTER_BOOT)

        api = cls(refuse, instance_id=instance_id)
        api.config = FirecrackerConfig.from_vm_config(vm.config)
        api.vm = vm
        api.started.set()
        return api

    @staticmethod
    def _no_restore(*_args):
        raise FaultError("snapshot-load is not available on this API (a VM was configured here already)")

    # --- dispatch --------------------------------------------------------------------
    def handle(self, method: str, path: str, body: bytes = b"") -> Response:
        route = path.split("?", 1)[0].rstrip("/") or "/"
        parts = route.strip("/").split("/") if route != "/" else []
        try:
            data = json.loads(body) if body.strip() else None
        except (ValueError, UnicodeDecodeError) as err:
            return fault(f"the request body is not valid JSON: {err}")
        with self._lock:
            try:
                return self._route(method.upper(), parts, data)
            except FaultError as err:
                return fault(str(err))
            except PyvmmError as err:  # a VMM-side refusal (a file, the lifecycle): one line, never a crash
                return fault(one_line(str(err)))
            except Exception as err:  # a bug: the VMM keeps serving and says what went wrong
                log.exception("API %s %s failed", method, path)
                return Response(500, {"fault_message": f"internal error: {type(err).__name__}: {err}"})

    def _handlers(self, parts: list[str]) -> dict:
        """(method, path shape) -> handler; ``parts`` gives the handlers the path's id."""
        return {
            ("GET", ()): self._instance_info,
            ("GET", ("version",)): lambda _: Response(200, {"firecracker_version": FIRECRACKER_VERSION}),
            ("GET", ("machine-config",)): lambda _: Response(200, dict(self.config.machine)),
            ("PUT", ("machine-config",)): lambda d: self._pre_boot(self.config.put_machine_config, d),
            ("PATCH", ("machine-config",)): lambda d: self._pre_boot(lambda b: self.config.put_machine_config(b, patch=True), d),
            ("PUT", ("boot-source",)): lambda d: self._pre_boot(self.config.put_boot_source, d),
            ("PUT", ("drives", "{id}")): lambda d: self._pre_boot(lambda b: self.config.put_drive(parts[1], b), d),
            ("PATCH", ("drives", "{id}")): lambda d: self._patch_drive(parts[1], d),
            ("PUT", ("network-interfaces", "{id}")): lambda d: self._pre_boot(
                lambda b: self.config.put_network_interface(parts[1], b), d),
            ("PATCH", ("network-interfaces", "{id}")): lambda d: self._patch_net(parts[1], d),
            ("PUT", ("entropy",)): lambda d: self._pre_boot(self.config.put_entropy, d),
            ("PUT", ("vsock",)): lambda d: self._pre_boot(self.config.put_vsock, d),
            ("GET", ("balloon",)): self._get_balloon,
            ("PUT", ("balloon",)): lambda d: self._pre_boot(self.config.put_balloon, d),
            ("PATCH", ("balloon",)): self._patch_balloon,
            ("GET", ("balloon", "statistics")): self._balloon_statistics,
            ("PATCH", ("balloon", "statistics")): self._patch_balloon_statistics,
            ("PUT", ("logger",)): lambda d: self._pre_boot(self._put_logger, d),
            ("PUT", ("metrics",)): lambda d: self._pre_boot(self._put_metrics, d),
            ("PUT", ("actions",)): self._action,
            ("PATCH", ("vm",)): self._patch_vm,
            ("GET", ("vm", "config")): lambda _: Response(200, self.config.as_json()),
            ("PUT", ("pyvmm", "coverage")): self._coverage,
            ("PUT", ("pyvmm", "trace")): self._trace,
            ("PUT", ("snapshot", "create")): self._snapshot_create,
            ("PUT", ("snapshot", "load")): self._snapshot_load,
        }

    def _route(self, method: str, parts: list[str], data) -> Response:
        shape = tuple(parts)
        if len(parts) == 2 and parts[0] in ("drives", "network-interfaces"):
            shape = (parts[0], "{id}")
        handlers = self._handlers(parts)
        handler = handlers.get((method, shape))
        if handler is not None and method in ("PUT", "PATCH") and data is None:
            return fault(f"{method} /{'/'.join(parts)}: the request needs a JSON body")
        if handler is None:
            allowed = sorted(m for (m, known) in handlers if known == shape)
            if allowed:
                return Response(405, {"fault_message": f"/{'/'.join(parts)} takes {', '.join(allowed)}, not {method}"},
                                allow=tuple(allowed))  # fmt: skip
            if parts and parts[0] in ("balloon", "mmds", "cpu-config", "hotplug"):
                return fault(f"/{'/'.join(parts)}: not supported by pyvmm yet")
            return fault(f"Invalid request method and/or path: {method} /{'/'.join(parts)}.")
        return handler(data)

    # --- pre-boot configuration ------------------------------------------------------------
    def _pre_boot(self, apply, data) -> Response:
        if self.vm is not None:
            return fault(NOT_AFTER_BOOT)
        apply({} if data is None else data)
        return Response(204)

    def _put_logger(self, body) -> None:
        self.config.put_logger(body)
        if "log_path" in body:
            try:
                handler = logging.FileHandler(body["log_path"])
            except OSError as err:
                raise FaultError(f"logger: field 'log_path' {body['log_path']!r}: {err.strerror}") from err
            handler.setFormatter(logging.Formatter("%(asctime)s [%(name)s:%(levelname)s] %(message)s"))
            level = LOG_LEVELS.get(body.get("level", "Info"))
            handler.setLevel(level or logging.CRITICAL + 1)
            root = logging.getLogger("pyvmm")
            if self._log_handler is not None:
                root.removeHandler(self._log_handler)
            root.addHandler(handler)
            if level and root.getEffectiveLevel() > logging.getLevelName(level):
                root.setLevel(level)
            self._log_handler = handler

    def _put_metrics(self, body) -> None:
        from pyvmm.vmm.metrics import MetricsWriter

        self.config.put_metrics(body)
        try:
            open(body["metrics_path"], "a").close()  # noqa: SIM115 - refuse a path that cannot be written now
        except OSError as err:
            raise FaultError(f"metrics: field 'metrics_path' {body['metrics_path']!r}: {err.strerror or err}") from err
        if self.metrics is not None:
            self.metrics.close()
        self.metrics = MetricsWriter(body["metrics_path"], lambda: self.vm.machine if self.vm else None)

    # --- post-boot -------------------------------------------------------------------------
    def _patch_drive(self, drive_id: str, data) -> Response:
        if self.vm is None:
            return self._pre_boot(lambda b: self.config.put_drive(drive_id, b, patch=True), data)
        body = check_body("drive", data or {}, patch=True)
        if drive_id not in self.config.drives:
            raise FaultError(f"drive '{drive_id}' does not exist")
        order = [d["drive_id"] for d in self.config.ordered_drives()]  # the guest's vda, vdb, ...
        patched = self.config.patched(self.config.drives[drive_id], body)
        if "path_on_host" in body and body["path_on_host"] != self.config.drives[drive_id]["path_on_host"]:
            self.vm.replace_drive(order.index(drive_id), body["path_on_host"])
        if body.get("rate_limiter") is not None:
            self.vm.set_drive_rate_limiter(order.index(drive_id), RateLimiterConfig.from_dict(patched["rate_limiter"]))
        self.config.drives[drive_id] = patched
        return Response(204)

    def _patch_net(self, iface_id: str, data) -> Response:
        if self.vm is None:
            return self._pre_boot(lambda b: self.config.put_network_interface(iface_id, b, patch=True), data)
        body = check_body("network-interface", data or {}, patch=True)
        if iface_id not in self.config.nets:
            raise FaultError(f"network interface '{iface_id}' does not exist")
        patched = self.config.patched(self.config.nets[iface_id], body)
        rx, tx = (RateLimiterConfig.from_dict(patched[key]) if body.get(key) is not None else None
                  for key in ("rx_rate_limiter", "tx_rate_limiter"))  # fmt: skip
        if rx is not None or tx is not None:
            self.vm.set_net_rate_limiters(list(self.config.nets).index(iface_id), rx, tx)
        self.config.nets[iface_id] = patched
        return Response(204)

    # --- the balloon -----------------------------------------------------------------------
    def _get_balloon(self, _data) -> Response:
        if self.config.balloon is None:
            raise FaultError("balloon: no balloon device is configured")
        return Response(200, dict(self.config.balloon))

    def _patch_balloon(self, data) -> Response:
        self._balloon_update(lambda: self.config.patch_balloon(data), lambda: self.vm.set_balloon(data["amount_mib"]))
        return Response(204)

    def _balloon_statistics(self, _data) -> Response:
        if self.config.balloon is None:
            raise FaultError("balloon: no balloon device is configured")
        if not self.config.balloon["stats_polling_interval_s"]:
            raise FaultError("balloon: statistics are not enabled (stats_polling_interval_s was 0 when the balloon "
                             "was configured)")  # fmt: skip
        if self.vm is None:
            return fault(NOT_BEFORE_BOOT)
        return Response(200, self.vm.balloon_statistics())

    def _patch_balloon_statistics(self, data) -> Response:
        self._balloon_update(lambda: self.config.patch_balloon_statistics(data, started=self.vm is not None),
                             lambda: self.vm.set_balloon_statistics_interval(data["stats_polling_interval_s"]))
        return Response(204)

    def _balloon_update(self, update_config, update_vm) -> None:
        """Check and record a balloon change, then (after boot) apply it; the record is undone if the VM refuses."""
        before = dict(self.config.balloon) if self.config.balloon is not None else None
        update_config()
        if self.vm is not None:
            try:
                update_vm()
            except BaseException:
                self.config.balloon = before
                raise

    def _action(self, data) -> Response:
        if not isinstance(data, dict) or set(data) != {"action_type"}:
            raise FaultError("actions: the body must be {\"action_type\": ...} with one of " + ", ".join(ACTIONS))
        action = data["action_type"]
        if action == "InstanceStart":
            if self.vm is not None:
                return fault(NOT_AFTER_BOOT)
            vm_config = self.config.to_vm_config(self.accel, self.cpu)
            self.vm = self.start_vm(vm_config)
            self.started.set()
            return Response(204)
        if action not in ACTIONS:
            raise FaultError(f"actions: unknown action_type {action!r}; expected one of {', '.join(ACTIONS)}")
        if self.vm is None:
            return fault(NOT_BEFORE_BOOT)
        if action == "SendCtrlAltDel":
            if not self.vm.machine.devices["i8042"].press_ctrl_alt_del():
                raise FaultError("SendCtrlAltDel: the guest has disabled its keyboard")
            return Response(204)
        if self.metrics is None:
            raise FaultError("FlushMetrics: no metrics file configured (PUT /metrics first)")
        self.metrics.flush()
        return Response(204)

    def _patch_vm(self, data) -> Response:
        if not isinstance(data, dict) or set(data) != {"state"} or data["state"] not in ("Paused", "Resumed"):
            raise FaultError('vm: the body must be {"state": "Paused"} or {"state": "Resumed"}')
        if self.vm is None:
            return fault(NOT_BEFORE_BOOT)
        if data["state"] == "Paused":
            self.vm.pause()
        else:
            self.vm.resume()
        return Response(204)

    # --- pyvmm's own: coverage and traces of the interpreter ---------------------------------
    def _recording(self, kind: str, data) -> tuple[dict, bool]:
        body = check_body(kind, data)
        if body["state"] not in ("On", "Off"):
            raise FaultError(f"{kind}: field 'state' must be \"On\" or \"Off\", not {body['state']!r}")
        if self.vm is None:
            raise FaultError(NOT_BEFORE_BOOT)
        on = body["state"] == "On"
        if on and not body.get("path"):
            raise FaultError(f"{kind}: field 'path' is required to turn it on")
        return body, on

    def _coverage(self, data) -> Response:
        body, on = self._recording("coverage", data)
        if on:
            self.vm.start_coverage(body["path"])
            return Response(204)
        return Response(200, {"blocks": self.vm.stop_coverage()})

    def _trace(self, data) -> Response:
        body, on = self._recording("trace", data)
        if on:
            limit = body.get("limit_mib", 64)
            if not 1 <= limit <= 1 << 20:
                raise FaultError(f"trace: field 'limit_mib' must be between 1 and 1048576, not {limit}")
            self.vm.start_trace(body["path"], limit_mib=limit)
            return Response(204)
        return Response(200, self.vm.stop_trace())

    # --- snapshots ---------------------------------------------------------------------------
    def _snapshot_create(self, data) -> Response:
        body = check_body("snapshot-create", data)
        kind = body.get("snapshot_type", "Full")
        if kind not in ("Full", "Diff"):
            raise FaultError(f"snapshot-create: field 'snapshot_type' must be \"Full\" or \"Diff\", not {kind!r}")
        if self.vm is None:
            return fault(NOT_BEFORE_BOOT)
        if self.vm.state is not VmState.PAUSED:
            raise FaultError("snapshot-create: the microVM must be paused first (PATCH /vm {\"state\": \"Paused\"})")
        self.vm.snapshot(body["snapshot_path"], body["mem_file_path"], diff=kind == "Diff")
        return Response(204)

    def _snapshot_load(self, data) -> Response:
        body = check_body("snapshot-load", data)
        if self.vm is not None:
            return fault(NOT_AFTER_BOOT)
        if ("mem_file_path" in body) == ("mem_backend" in body):
            raise FaultError("snapshot-load: give exactly one of 'mem_file_path' and 'mem_backend'")
        mem_path = body.get("mem_file_path")
        if "mem_backend" in body:
            backend = check_body("mem_backend", body["mem_backend"])
            if backend["backend_type"] != "File":
                raise FaultError(f"snapshot-load: mem_backend.backend_type {backend['backend_type']!r} is not supported "
                                 "(only \"File\")")  # fmt: skip
            mem_path = backend["backend_path"]
        track = body.get("track_dirty_pages", body.get("enable_diff_snapshots"))  # the older name
        self.vm = self.restore_vm(body["snapshot_path"], mem_path, bool(body.get("resume_vm", False)), track)
        self.config = FirecrackerConfig.from_vm_config(self.vm.config)
        self.started.set()
        return Response(204)

    def _instance_info(self, _data) -> Response:
        state = "Not started"
        if self.vm is not None:
            state = {VmState.RUNNING: "Running", VmState.PAUSED: "Paused"}.get(self.vm.state, "Not started")
        return Response(200, {"app_name": "Firecracker", "id": self.instance_id, "state": state,
                              "vmm_version": f"{FIRECRACKER_VERSION} (pyvmm {__version__})"})  # fmt: skip

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.flush()
            self.metrics.close()
        if self._log_handler is not None:
            logging.getLogger("pyvmm").removeHandler(self._log_handler)
            self._log_handler.close()

