"""docs/openapi.yaml against the API pyvmm serves, by schemathesis (property-based requests).

The routes (pyvmm/server/routes.py) are served through a small WSGI adapter, with a
VM factory that starts nothing: every request schemathesis makes from the document
(good and bad bodies) must get an answer the document allows (status and body
shape) and never a server error. The short run here makes PYVMM_SCHEMATHESIS_EXAMPLES
(default 25) examples per operation; a long run by hand sets it higher.
"""

from __future__ import annotations

import os
from http import HTTPStatus
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a test dependency (pip install -e '.[test]')")
from hypothesis import HealthCheck, settings  # noqa: E402

from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from pyvmm.server.firecracker import FaultError  # noqa: E402
from pyvmm.server.routes import FirecrackerApi  # noqa: E402
from pyvmm.vmm.states import VmState  # noqa: E402

SPEC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
EXAMPLES = int(os.environ.get("PYVMM_SCHEMATHESIS_EXAMPLES", "25"))


class _Vm:
    """A started VM as far as the API can tell (nothing runs)."""

    def __init__(self, config):
        self.config, self.state = config, VmState.RUNNING
        self.machine = type("M", (), {"devices": {"i8042": type("K", (), {"press_ctrl_alt_del": lambda s: True})()}})()

    def pause(self):
        self.state = VmState.PAUSED

    def resume(self):
        self.state = VmState.RUNNING

    def snapshot(self, *args, **kwargs):
        raise FaultError("snapshot: refused by the test's VM")

    def start_coverage(self, *args, **kwargs):
        raise FaultError("coverage: refused by the test's VM")

    stop_coverage = start_trace = stop_trace = start_coverage


def _refuse_restore(*args):
    raise FaultError("snapshot-load: refused by the test's VM")


CURRENT = {}


@pytest.fixture(autouse=True)
def fresh_api(tmp_path, monkeypatch):
    """A new API per test, in a scratch folder (log and metrics paths the examples name land there)."""
    monkeypatch.chdir(tmp_path)
    CURRENT["api"] = FirecrackerApi(_Vm, restore_vm=_refuse_restore)
    yield
    CURRENT.pop("api").close()


def make_app():
    def app(environ, start_response):
        api = CURRENT.get("api") or FirecrackerApi(_Vm, restore_vm=_refuse_restore)
        path, method = environ.get("PATH_INFO", "/"), environ["REQUEST_METHOD"]
        if path == "/openapi.yaml":
            start_response("200 OK", [("Content-Type", "application/yaml")])
            return [SPEC.read_bytes()]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        response = api.handle(method, path, environ["wsgi.input"].read(length) if length else b"")
        payload = response.encoded()
        headers = [("Content-Length", str(len(payload)))] + ([("Content-Type", "application/json")] if payload else [])
        if response.allow:
            headers.append(("Allow", ", ".join(response.allow)))
        start_response(f"{response.status} {HTTPStatus(response.status).phrase}", headers)
        return [payload]

    return app


schema = schemathesis.openapi.from_wsgi("/openapi.yaml", make_app())


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_is_one_the_document_allows(case):
    # Not checked: that a schema-valid body is accepted. Firecracker's API refuses valid bodies
    # with 400 when the state does not allow them (pre-boot objects after InstanceStart) or the
    # host does not (a kernel path that does not exist), and pyvmm answers as Firecracker does.
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
