"""Bring back a Python-backend model whose stub process died.

What Triton 2.51's python backend does when a stub dies (measured, tests/test_faults.py): it does *not* restart it.
Requests being executed by that instance, and every later one, fail at once with INTERNAL (HTTP 500)
`Stub process '<instance>' is not healthy.`, while `/v2/health/ready` and the model's own ready endpoint keep
answering 200, so no load balancer or orchestrator notices. The only in-process cure is reloading the model.

This watchdog does that: it polls /proc for the server's `triton_python_backend_stub` children and, when an instance
that was there is gone or a model runs fewer stubs than its config's instances (a stub that died before the watchdog
started), reloads its model through the repository API with a config that differs only in one
`watchdog_generation` parameter (a reload with an unchanged config is a no-op for Triton). Triton then loads new
instances next to the broken one and swaps them in: the ensemble stays READY throughout, and requests succeed again
once the new stub has initialised (seconds). It needs the server started with SELF_HEAL_ARGS (explicit model control,
all models loaded at start-up) and, where the repository API is restricted, the admin secret.

    python -m facefuse.watchdog [--server-pid PID] [--url 127.0.0.1:8000]   # admin secret from TRITON_ADMIN_KEY

It must share the server's PID namespace (same host or container; docker compose: `pid: "service:triton"`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from facefuse.procfs import find_server_pid, is_alive, stub_processes

# Explicit model control lets the repository API reload a model; `--load-model=*` keeps start-up loading everything.
SELF_HEAL_ARGS = ("--model-control-mode=explicit", "--load-model=*")
ADMIN_HEADER = "admin-key"  # as facefuse.local_server.ADMIN_HEADER (not imported: keep this module stdlib-only)
GENERATION_KEY = "watchdog_generation"
RETRY_AFTER_S = 10.0


@dataclass(frozen=True)
class Reload:
    """One reload the watchdog made: which model, for which dead stub instances, how it went."""

    at: float  # time.time() when the dead stub was seen
    model: str
    instances: tuple[str, ...]
    ok: bool
    seconds: float
    detail: str = ""


def configured_stubs(config: dict) -> int:
    """Stub processes a python-backend model runs, from its config as Triton serves it (/v2/models/<name>/config):
    each instance group's count, per GPU for a group on GPUs."""
    return sum(int(group.get("count", 1)) * max(1, len(group.get("gpus") or []))
               for group in config.get("instance_group") or [{}])


class StubWatchdog:
    """Polls the stubs of the server `server_pid` every `interval_s` and reloads models whose stub died."""

    def __init__(self, server_pid: int, url: str = "127.0.0.1:8000", admin_secret: str | None = None,
                 interval_s: float = 1.0, report: Callable[[str], None] | None = None) -> None:
        self.server_pid = server_pid
        self.base = f"http://{url}"
        self.headers = {ADMIN_HEADER: admin_secret} if admin_secret else {}
        self.interval_s = interval_s
        self.report = report or (lambda message: print(f"[watchdog] {message}", file=sys.stderr, flush=True))
        self.reloads: list[Reload] = []
        self._expected: dict[str, str] = {}  # instance -> model, as last seen healthy
        self._python_models: dict[str, int] | None = None  # READY python-backend models -> stubs, read once
        self._retry_at: dict[str, float] = {}  # model -> monotonic time before which a failed reload is not retried
        self._generation = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- HTTP ------------------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None = None, timeout: float = 300.0) -> bytes:
        request = urllib.request.Request(self.base + path, data=body, method=method, headers=self.headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def _server_ready(self) -> bool:
        try:
            self._request("GET", "/v2/health/ready", timeout=5)
            return True
        except (OSError, urllib.error.HTTPError):
            return False

    def _model_states(self) -> dict[str, str]:
        index = json.loads(self._request("POST", "/v2/repository/index", b"{}", timeout=10))
        return {entry["name"]: entry.get("state", "") for entry in index}

    def _read_python_models(self) -> dict[str, int]:
        """READY models served by the python backend, each with the number of stubs its instances run."""
        models = {}
        for name, state in self._model_states().items():
            if state == "READY":
                config = json.loads(self._request("GET", f"/v2/models/{name}/config", timeout=10))
                if config.get("backend") == "python":
                    models[name] = configured_stubs(config)
        return models

    def reload_model(self, model: str) -> None:
        """Reload `model` in place: its current config plus a new `watchdog_generation` parameter."""
        config = json.loads(self._request("GET", f"/v2/models/{model}/config", timeout=10))
        self._generation += 1
        config.setdefault("parameters", {})[GENERATION_KEY] = {"string_value": f"{time.time():.0f}-{self._generation}"}
        body = json.dumps({"parameters": {"config": json.dumps(config)}}).encode()
        self._request("POST", f"/v2/repository/models/{model}/load", body)

    # -- polling ---------------------------------------------------------------------------------------------------

    def check(self) -> list[Reload]:
        """One pass: reload every model with a vanished stub; returns the reloads made."""
        if self._python_models is None and self._server_ready():
            try:
                self._python_models = self._read_python_models()
            except (OSError, ValueError) as error:
                self.report(f"cannot list the python-backend models: {error}")
        current = stub_processes(self.server_pid)
        missing: dict[str, list[str]] = {}
        for instance, model in self._expected.items():
            if instance not in current:
                missing.setdefault(model, []).append(instance)
        # Fewer stubs than the model's instances, e.g. stubs that died before this watchdog first looked.
        live = collections.Counter(stub.model for stub in current.values())
        for model, expected in sorted((self._python_models or {}).items()):
            if live[model] < expected and model not in missing:
                missing[model] = [f"{model} ({expected - live[model]} of {expected} instances)"]
        made = []
        # A stub also vanishes while the server shuts down or an operator reloads a model; only a server that is
        # ready, with the model still READY (Triton keeps it so when its stub dies), gets a reload.
        if missing and is_alive(self.server_pid) and self._server_ready():
            try:
                states = self._model_states()
            except (OSError, ValueError) as error:
                states = {}
                self.report(f"cannot read the repository index: {error}")
            for model, instances in missing.items():
                if states.get(model) != "READY" or time.monotonic() < self._retry_at.get(model, 0.0):
                    continue
                seen = time.time()
                self.report(f"stub of {', '.join(instances)} died; reloading model '{model}'")
                try:
                    self.reload_model(model)
                    result = Reload(seen, model, tuple(instances), True, time.time() - seen)
                    self.report(f"model '{model}' reloaded in {result.seconds:.1f} s")
                except urllib.error.HTTPError as error:
                    detail = error.read().decode(errors="replace")[:300]
                    if "not allowed" in detail:
                        detail += f" (start the server with {' '.join(SELF_HEAL_ARGS)})"
                    result = Reload(seen, model, tuple(instances), False, time.time() - seen, detail)
                    self.report(f"reloading '{model}' failed: HTTP {error.code} {detail}")
                except OSError as error:
                    result = Reload(seen, model, tuple(instances), False, time.time() - seen, str(error))
                    self.report(f"reloading '{model}' failed: {error}")
                if not result.ok:  # try again later, not at every poll
                    self._retry_at[model] = time.monotonic() + RETRY_AFTER_S
                self.reloads.append(result)
                made.append(result)
            current = stub_processes(self.server_pid)
        # Remember what is there now; instances of a failed reload stay expected, so the next pass tries again.
        still_missing = {instance: model for model, instances in missing.items() for instance in instances
                         if instance not in current and instance in self._expected}
        self._expected = {**{instance: stub.model for instance, stub in current.items()}, **still_missing}
        return made

    def run(self) -> None:
        while not self._stop.is_set() and is_alive(self.server_pid):
            try:
                self.check()
            except Exception as error:  # noqa: BLE001 - a watchdog must outlive its own hiccups
                self.report(f"check failed: {type(error).__name__}: {error}")
            self._stop.wait(self.interval_s)

    def start(self) -> StubWatchdog:
        self._thread = threading.Thread(target=self.run, name="stub-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Reload Triton Python-backend models whose stub process died.")
    parser.add_argument("--server-pid", type=int, default=None, help="default: the one `tritonserver` process")
    parser.add_argument("--url", default=f"127.0.0.1:{os.environ.get('HTTP_PORT', '8000')}", help="HTTP host:port")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between checks")
    args = parser.parse_args(argv)
    pid = args.server_pid or find_server_pid()
    if pid is None:
        print("[watchdog] no tritonserver process found", file=sys.stderr)
        return 1
    watchdog = StubWatchdog(pid, args.url, os.environ.get("TRITON_ADMIN_KEY"), args.interval)
    watchdog.report(f"guarding the stubs of tritonserver pid {pid} via {watchdog.base}")
    with contextlib.suppress(KeyboardInterrupt):
        watchdog.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
