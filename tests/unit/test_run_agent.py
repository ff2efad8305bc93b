"""The guest agent and its host side, over a socket pair (no VM): the same code runs in the guest."""

from __future__ import annotations

import hashlib
import socket
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.run import agent
from pyvmm.run.session import AgentError, run_command


def run(argv, **kwargs):
    host, guest = socket.socketpair()
    server = threading.Thread(target=agent._connection, args=(guest,), daemon=True)
    server.start()
    try:
        return run_command(host, argv, **kwargs)
    finally:
        server.join(30)


def test_output_status_and_streams_are_kept_apart():
    result = run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.status, result.stdout, result.stderr, result.signal) == (3, b"out\n", b"err\n", None)


def test_input_reaches_the_command_and_large_output_comes_back_whole():
    data = bytes(range(256)) * 16384  # 4 MiB both ways: more than any pipe or frame holds
    result = run(["sh", "-c", "cat; head -c 3000000 /dev/zero"], input=data)
    assert result.status == 0
    assert hashlib.sha256(result.stdout[: len(data)]).digest() == hashlib.sha256(data).digest()
    assert result.stdout[len(data) :] == bytes(3000000)


def test_a_command_that_does_not_read_its_input_does_not_wedge_the_agent():
    result = run(["sh", "-c", "sleep 0.2; echo done"], input=b"x" * (3 << 20))
    assert result.status == 0 and result.stdout == b"done\n"


def test_cwd_env_and_a_killing_signal_are_reported():
    result = run(["sh", "-c", 'pwd; echo "$GREETING"; kill -TERM $$'], cwd="/tmp", env={"GREETING": "hi", "PATH": "/usr/bin:/bin"})
    assert result.stdout == b"/tmp\nhi\n"
    assert (result.status, result.signal) == (128 + 15, 15)


def test_a_hung_command_is_killed_at_its_timeout_and_said_so():
    result = run(["sh", "-c", "echo started; sleep 60"], timeout=0.5)
    assert result.timed_out and result.signal == 9 and result.stdout == b"started\n"


def test_a_command_that_cannot_start_is_a_one_line_error():
    with pytest.raises(AgentError, match="cannot run.*no-such-program"):
        run(["/no-such-program"])


def test_a_bad_command_is_refused_before_anything_is_sent():
    with pytest.raises(AgentError, match="non-empty list of strings"):
        run([])


@given(st.binary(max_size=64))
def test_the_frame_decoder_takes_any_bytes_without_crashing(data):
    decoder = agent.FrameDecoder()
    try:
        frames = decoder.feed(data)
    except agent.ProtocolError:
        return
    assert all(kind in agent.KIND_NAMES and len(payload) <= agent.MAX_FRAME for kind, payload in frames)


def test_frames_split_anywhere_decode_the_same():
    stream = agent.frame(agent.STDOUT, b"hello") + agent.json_frame(agent.EXIT, {"status": 0})
    for cut in range(len(stream) + 1):
        decoder = agent.FrameDecoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == [(agent.STDOUT, b"hello"),
                                                                            (agent.EXIT, b'{"status": 0}')]


def test_an_oversized_or_unknown_frame_is_refused():
    with pytest.raises(agent.ProtocolError, match="exceeds"):
        agent.FrameDecoder().feed(agent.HEADER.pack(agent.STDOUT, agent.MAX_FRAME + 1))
    with pytest.raises(agent.ProtocolError, match="unknown frame kind 99"):
        agent.FrameDecoder().feed(agent.HEADER.pack(99, 0))
