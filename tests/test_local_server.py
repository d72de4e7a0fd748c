"""facefuse.local_server's process handling and the stub watchdog's arithmetic, with stand-ins (the live server is
in the other tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facefuse.local_server import die_with_parent_prefix, stop_process
from facefuse.procfs import group_members, is_alive

REPO = Path(__file__).resolve().parents[1]


def test_stop_process_kills_what_an_exited_server_left_in_its_group(tmp_path):
    """A server that exits on its own (Triton's "Exit timeout expired. Exiting immediately.") and leaves a child
    behind, as its Python stubs: stop_process ends the child too, so the next server gets the GPU memory back."""
    pid_file = tmp_path / "child.pid"
    server = subprocess.Popen(["bash", "-c", f"sleep 300 & echo $! > {pid_file}; exit 3"], start_new_session=True)
    server.wait(10)
    child = int(pid_file.read_text())
    assert is_alive(child) and group_members(server.pid) == [child]

    assert stop_process(server) == 3
    deadline = time.monotonic() + 5
    while is_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_alive(child)
    assert group_members(server.pid) == []


def test_stop_process_interrupts_a_running_server_and_its_children():
    server = subprocess.Popen(["bash", "-c", "sleep 300 & wait"], start_new_session=True)
    time.sleep(0.3)
    assert len(group_members(server.pid)) == 2  # bash and its sleep
    stop_process(server, timeout_s=5)
    assert server.poll() is not None and group_members(server.pid) == []


def test_watchdog_counts_the_stubs_a_models_config_runs():
    """A model one stub short of its instances is reloaded even when the watchdog never saw the dead stub: the count
    comes from the config Triton serves (KIND_GPU groups run their count on each of their GPUs)."""
    from facefuse.watchdog import configured_stubs

    assert configured_stubs({"instance_group": [{"count": 2, "kind": "KIND_CPU", "gpus": []}]}) == 2
    assert configured_stubs({"instance_group": [{"count": 3, "kind": "KIND_GPU", "gpus": [0, 1]},
                                                {"count": 1, "kind": "KIND_CPU"}]}) == 7
    assert configured_stubs({}) == 1  # no group: Triton's one instance


def test_stop_command_ends_the_recorded_server_and_what_it_left(tmp_path, monkeypatch):
    """`python -m facefuse.local_server stop` (`make stop`): SIGINT to the server `start` recorded, then its group."""
    import facefuse.local_server as local_server

    pid_file = tmp_path / "child.pid"
    # A stand-in server that exits on SIGINT and leaves its child behind, as a Triton that gave up its shutdown.
    server = subprocess.Popen(["bash", "-c", f"sleep 300 & echo $! > {pid_file}; trap 'exit 0' INT; wait"],
                              start_new_session=True)
    deadline = time.monotonic() + 5
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    monkeypatch.setattr(local_server, "PID_FILE", tmp_path / "server.pid")
    local_server.PID_FILE.write_text(str(server.pid))

    assert local_server.main(["stop"]) == 0
    server.wait(5)
    assert not is_alive(child) and group_members(server.pid) == []
    assert not local_server.PID_FILE.exists()


# A benchmark's life in small: a server in its own session (as start() makes it), stopped in a finally block; the
# process then gets the SIGTERM that `timeout` sends.
_SIGTERMED_RUN = """
import os, signal, subprocess, sys, time
from facefuse.local_server import sigterm_as_interrupt, stop_process
with sigterm_as_interrupt():
    server = subprocess.Popen(["bash", "-c", "sleep 300 & wait"], start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        print(server.pid, flush=True)  # inside the try: the test signals only after reading it
        time.sleep(60)
    finally:
        stop_process(server, timeout_s=5)
        print("stopped", flush=True)
"""


@pytest.mark.parametrize("handled", [True, False])
def test_sigterm_still_stops_the_server_a_run_started(handled):
    """With sigterm_as_interrupt, a SIGTERM runs the finally that stops the server; without it (the check that
    the test can fail) the server's session outlives the run."""
    import sys

    code = _SIGTERMED_RUN if handled else _SIGTERMED_RUN.replace("with sigterm_as_interrupt():", "if True:")
    run = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    server_pid = int(run.stdout.readline())
    deadline = time.monotonic() + 10
    while len(group_members(server_pid)) < 2 and time.monotonic() < deadline:  # bash and its sleep
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    output = run.communicate(timeout=30)[0]
    try:
        if handled:
            assert "stopped" in output and group_members(server_pid) == []
        else:
            assert "stopped" not in output and group_members(server_pid) != []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server_pid, signal.SIGKILL)


def _orphan_after_sigkill(prefix: list[str]) -> int:
    """A starter process runs `sleep 60` behind ``prefix`` and is then SIGKILLed; returns the sleep's pid."""
    script = ("import subprocess, sys, time\n"
              f"child = subprocess.Popen({prefix!r} + ['sleep', '60'], start_new_session=True)\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(60)\n")
    starter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(starter.stdout.readline())
    time.sleep(0.3)  # setpriv has exec'd the command
    starter.kill()
    starter.wait(10)
    return child


@pytest.mark.skipif(not die_with_parent_prefix(), reason="util-linux's setpriv is not installed")
def test_a_server_started_behind_the_prefix_ends_when_its_starter_is_killed():
    # SIGKILL runs no `finally`: the prefix's parent-death signal is what stops the server. Without it (the
    # control) the command outlives its starter, as servers of killed benchmark and test runs did.
    guarded = _orphan_after_sigkill(die_with_parent_prefix())
    unguarded = _orphan_after_sigkill([])
    try:
        deadline = time.monotonic() + 5
        while is_alive(guarded) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_alive(guarded)
        assert is_alive(unguarded)
    finally:
        for pid in (guarded, unguarded):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_start_puts_the_prefix_before_the_server_unless_it_must_outlive_its_starter(tmp_path, monkeypatch):
    # `start` (the background server) must outlive the command; every other caller's server goes with it.
    from facefuse import local_server

    launched = []

    class Exited:
        pid, returncode = 12345, 1

        def __init__(self, command, **kwargs):
            launched.append(command)

        def poll(self):
            return 1

    monkeypatch.setattr(local_server.subprocess, "Popen", Exited)
    monkeypatch.setattr(local_server, "die_with_parent_prefix", lambda: ["setpriv", "--pdeathsig", "TERM", "--"])
    ports = local_server.free_ports()
    for die_with_parent in (True, False):
        with pytest.raises(RuntimeError, match="exited with 1"):
            local_server.start(ports, tmp_path / "log", die_with_parent=die_with_parent)
    assert launched[0][:4] == ["setpriv", "--pdeathsig", "TERM", "--"]
    assert launched[0][4:] == launched[1] == local_server.server_command(ports)
    assert launched[1][0].endswith("tritonserver")
