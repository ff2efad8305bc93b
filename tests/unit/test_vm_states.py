"""The lifecycle table (vmm/states.py), without a VM."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.vmm.states import ACTIONS, TRANSITIONS, TransitionError, VmState, VmStates


def test_the_documented_path_and_its_events():
    states = VmStates(clock=lambda: 12.5)
    kinds = [states.record(action).kind for action in ("configure", "start", "pause", "snapshot", "resume", "pause")]
    assert kinds == ["configured", "started", "paused", "snapshot-created", "resumed", "paused"]
    event = states.record("stop", reason="guest reset")
    assert event.as_json() == {"event": "stopped", "state": "Stopped", "time": 12.5, "reason": "guest reset"}


@pytest.mark.parametrize("actions, refused", [
    (["configure", "start", "snapshot"], "cannot snapshot the VM: it is Running (allowed: pause, stop)"),
    (["pause"], "cannot pause the VM: it is Created (allowed: configure, stop)"),
    (["configure", "start", "stop", "resume"], "cannot resume the VM: it is Stopped"),
])  # fmt: skip
def test_a_refused_action_names_the_state_and_what_is_allowed(actions, refused):
    states = VmStates()
    for action in actions[:-1]:
        states.record(action)
    with pytest.raises(TransitionError) as info:
        states.record(actions[-1])
    assert str(info.value) == refused
    assert states.state is not None and states.allows(actions[-1]) is False


def test_an_unknown_action_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown lifecycle action 'jump'"):
        VmStates().check("jump")


@given(st.lists(st.sampled_from(ACTIONS), max_size=30))
def test_any_sequence_follows_the_table(actions):
    states = VmStates()
    for action in actions:
        before = states.state
        if (before, action) in TRANSITIONS:
            event = states.record(action)
            assert event.state is TRANSITIONS[(before, action)][0] is states.state
        else:
            with pytest.raises(TransitionError):
                states.record(action)
            assert states.state is before
        if states.state is VmState.STOPPED:
            assert not any(states.allows(a) for a in ACTIONS), "Stopped is final"
