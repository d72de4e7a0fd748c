"""facefuse.local_server's process handling, with stand-in processes (the live server is in the other tests)."""

from __future__ import annotations

import subprocess
import time

from facefuse.local_server import stop_process
from facefuse.procfs import group_members, is_alive


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
