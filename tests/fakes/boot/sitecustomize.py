"""For ``pyvmm`` child processes of the contract tests: PYVMM_FAKE_PLATFORM=hvf|whpx routes that backend
to its fake (tests/fakes) before pyvmm starts. Only the tests put this directory on PYTHONPATH."""

import os
import sys

_name = os.environ.get("PYVMM_FAKE_PLATFORM")
if _name:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from fakes import install

    install(_name)
