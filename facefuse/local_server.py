"""Run the real Triton server shipped in the nvidia-pytriton wheel on this repository's model repository.

    python -m facefuse.local_server start   # background; waits until ready; pid in .cache/triton/server.pid
    python -m facefuse.local_server serve   # foreground; Ctrl-C stops it
    python -m facefuse.local_server stop

Ports default to 8000 (HTTP), 8001 (gRPC), 8002 (metrics); override with --http-port/--grpc-port/--metrics-port
or HTTP_PORT/GRPC_PORT/METRICS_PORT. With TRITON_ADMIN_KEY set, the restricted APIs (RESTRICTED_APIS) need the
header `admin-key: $TRITON_ADMIN_KEY`, as in docker compose behind the gateway (gateway/). `serve` and `start` run the
server with explicit model control and facefuse/watchdog.py, which reloads a model whose Python stub died.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from facefuse.procfs import group_members, is_alive

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
CACHE_DIR = REPO_ROOT / ".cache" / "triton"
PID_FILE = CACHE_DIR / "server.pid"
DEFAULT_LOG = REPO_ROOT / "out" / "triton.log"
# Triton APIs that only the operator needs: loading/unloading models, configs, statistics, logging, tracing and
# shared-memory registration. Health, metadata and inference stay open to Triton (the gateway checks API keys).
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "logging", "trace", "statistics")
ADMIN_HEADER = "admin-key"  # over gRPC Triton reads it as metadata `triton-grpc-protocol-admin-key`


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def from_env(cls) -> Ports:
        return cls(int(os.environ.get("HTTP_PORT", 8000)), int(os.environ.get("GRPC_PORT", 8001)),
                   int(os.environ.get("METRICS_PORT", 8002)))


def pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed in this environment (run `make venv`)")
    return Path(spec.submodule_search_locations[0])


def backend_directory() -> Path:
    """A backends folder whose python backend carries the stub built for this interpreter's version."""
    triton = pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"the pytriton wheel has no Python-backend stub for Python {version}")
    python_backend = CACHE_DIR / "backends" / "python"
    python_backend.mkdir(parents=True, exist_ok=True)
    for source in [*sorted((triton / "backends" / "python").glob("*.*")), stub]:
        destination = python_backend / source.name
        if source.is_file() and (not destination.exists() or destination.stat().st_mtime < source.stat().st_mtime):
            shutil.copy2(source, destination)
    return python_backend.parent


def server_environment() -> dict[str, str]:
    """The stub imports our package and this interpreter's packages; the binary needs the wheel's bundled libraries.

    PYTHONPATH: the repository, the pytriton wheel's folder, what the caller already had on PYTHONPATH (e.g. a
    numpy<2 overlay on a GPU host), then this interpreter's site-packages.
    """
    root = pytriton_root()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        part for part in (str(root.parent / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH", "")) if part)
    site_packages = [path for path in sys.path if path.endswith("site-packages")]
    entries = [str(REPO_ROOT), str(root.parent), *env.get("PYTHONPATH", "").split(os.pathsep), *site_packages]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(entry for entry in entries if entry))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


GPU_CONFIG_NAME = "gpu"  # docker compose runs `tritonserver --model-config-name=gpu`
# The models that hold GPU work: TensorRT fusion, and the Python models (preprocess runs MTCNN and the face mesh on
# CUDA). The ensemble has no instances of its own.
GPU_MODELS = ("preprocess", "fusion", "postprocess")


def gpu_config_path(model: str, repository: Path = MODEL_REPOSITORY) -> Path:
    """The config Triton reads under --model-config-name=gpu: configs/gpu.pbtxt where present, else config.pbtxt."""
    named = repository / model / "configs" / f"{GPU_CONFIG_NAME}.pbtxt"
    return named if named.is_file() else repository / model / "config.pbtxt"


# Python-backend models hand GPU tensors to each other (DLPack) through Triton's CUDA memory pool: every request
# between preprocess and the end of postprocess holds its target there (6 MB at 1080p). 2 GiB per GPU covers ~340
# 1080p requests in flight, about what the queue limits admit; when the pool runs out Triton 2.51 hands the next model
# an empty tensor (postprocess then fails that request with INTERNAL_ERROR naming the pool). Triton's default: 64 MB.
CUDA_POOL_BYTES = 2 << 30


def cuda_pool_args(device_folder: Path = Path("/dev"), environ: dict[str, str] | None = None) -> list[str]:
    """--cuda-memory-pool-byte-size for each GPU Triton will see (numbered after CUDA_VISIBLE_DEVICES, else one per
    /dev/nvidiaN node); none on a CPU-only host."""
    visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = len([part for part in visible.split(",") if part.strip() and part.strip() != "-1"])
    else:
        count = sum(1 for path in device_folder.glob("nvidia*") if path.name.removeprefix("nvidia").isdigit())
    return [f"--cuda-memory-pool-byte-size={number}:{CUDA_POOL_BYTES}" for number in range(count)]


def server_command(ports: Ports, model_repository: Path = MODEL_REPOSITORY,
                   extra: list[str] | None = None) -> list[str]:
    binary = pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    return [
        str(binary), f"--model-repository={model_repository}", f"--backend-directory={backend_directory()}",
        f"--http-port={ports.http}", f"--grpc-port={ports.grpc}", f"--metrics-port={ports.metrics}",
        "--exit-timeout-secs=30", "--log-verbose=0", *cuda_pool_args(), *(extra or []),
    ]


def restricted_api_args(admin_secret: str, header: str = ADMIN_HEADER) -> list[str]:
    """Triton 2.51 flags that make RESTRICTED_APIS require `<header>: <admin_secret>` over HTTP and gRPC."""
    apis = ",".join(RESTRICTED_APIS)
    return [f"--http-restricted-api={apis}:{header}={admin_secret}",
            f"--grpc-restricted-protocol={apis}:{header}={admin_secret}"]


def is_ready(ports: Ports, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/health/ready", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def free_port() -> int:
    """A TCP port nothing listens on right now (for tests and benchmarks that start their own server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports() -> Ports:
    return Ports(free_port(), free_port(), free_port())


def die_with_parent_prefix() -> list[str]:
    """`setpriv --pdeathsig TERM --` (util-linux) before a command, where setpriv is present, else nothing: the
    command then gets SIGTERM when the thread that started it ends, also when its process is killed outright
    (SIGKILL, the OOM killer), which no `finally` survives. Before, a benchmark or test run killed that way left its
    server running with its models' memory (the server leads its own session, out of reach of the killer's group)."""
    return list(_pdeathsig_prefix())


@functools.lru_cache(maxsize=1)
def _pdeathsig_prefix() -> tuple[str, ...]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    prefix = (setpriv, "--pdeathsig", "TERM", "--")
    try:  # util-linux before 2.33 has setpriv without --pdeathsig: it would refuse to start the server
        works = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        works = False
    return prefix if works else ()


def start(ports: Ports, log_path: Path = DEFAULT_LOG, model_repository: Path = MODEL_REPOSITORY,
          timeout_s: float = 240.0, extra: list[str] | None = None, quiet: bool = False,
          environment: dict[str, str] | None = None, die_with_parent: bool = True) -> subprocess.Popen:
    """Start the server in the background (``environment`` added to its own, e.g. MpsDaemon.environment()) and wait
    until /v2/health/ready answers 200. ``die_with_parent``: the server ends (SIGTERM, a graceful stop) when the
    calling thread does, however it ends (``die_with_parent_prefix``); call from the main thread, or pass False for
    a server that must outlive its starter (`start` below)."""
    if is_ready(ports):
        raise RuntimeError(f"a server already answers on HTTP port {ports.http}; stop it or choose other ports")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child process
    # setpriv execs the server in its own process: the pid below is the server's.
    command = [*(die_with_parent_prefix() if die_with_parent else []), *server_command(ports, model_repository, extra)]
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                               env={**server_environment(), **(environment or {})}, start_new_session=True)
    started = time.monotonic()
    if not quiet:
        print(f"[serve] tritonserver pid {process.pid}, HTTP {ports.http}, gRPC {ports.grpc}, "
              f"metrics {ports.metrics}; log {log_path}", flush=True)
    next_note = 10.0
    while not is_ready(ports):
        elapsed = time.monotonic() - started
        if process.poll() is not None:
            raise RuntimeError(f"tritonserver exited with {process.returncode} while loading; "
                               f"last log lines:\n{_tail(log_path)}")
        if elapsed > timeout_s:
            stop_process(process)
            raise RuntimeError(f"tritonserver not ready after {timeout_s:.0f} s; last log lines:\n{_tail(log_path)}")
        if not quiet and elapsed > next_note:
            print(f"[serve] still loading models ({elapsed:.0f} s)...", flush=True)
            next_note += 10.0
        time.sleep(0.5)
    if not quiet:
        print(f"[serve] ready in {time.monotonic() - started:.1f} s", flush=True)
    return process


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (a time limit's `timeout`, `docker stop`, a service manager) is handled as Ctrl-C,
    so that the `finally` blocks that stop the server and the MPS daemon run: the server leads its own session, out
    of reach of a signal sent to this process. Seen on the device tool's H100: a benchmark ended by `timeout` left
    its server and MPS daemon behind, and the next benchmark's daemon was refused ("already running"). The earlier
    handler comes back after the block. Main thread only."""
    earlier = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, earlier)


def stop_process(process: subprocess.Popen, timeout_s: float = 45.0, leftovers_wait_s: float = 10.0) -> int:
    """SIGINT (Triton finishes in-flight requests), then SIGKILL the group if it lingers; then whatever is left of
    its process group once it has exited (the model stubs) is killed too and waited for.

    A server that gives up its own shutdown ("Exit timeout expired. Exiting immediately.", seen on an H100 after a
    c=128 sweep) leaves its Python stubs running, each holding its GPU memory (6.3 GiB there): the next server on
    that GPU then failed to load its models."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    end_leftovers(process.pid, leftovers_wait_s)
    return process.returncode


def end_leftovers(server_pid: int, wait_s: float = 10.0) -> list[int]:
    """Kill what is left of an exited server's process group (start() makes the server a group leader, so the group
    is its own children: the model stubs) and wait up to ``wait_s`` for it; returns the pids still alive."""
    deadline = time.monotonic() + wait_s
    while (leftovers := group_members(server_pid)) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server_pid, signal.SIGKILL)
        time.sleep(0.1)
    if leftovers:
        print(f"[serve] processes of the stopped server still alive after {wait_s:.0f} s: {leftovers}",
              file=sys.stderr, flush=True)
    return leftovers


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the local Triton server on model_repository/.")
    parser.add_argument("action", choices=("start", "serve", "stop"))
    defaults = Ports.from_env()
    parser.add_argument("--http-port", type=int, default=defaults.http)
    parser.add_argument("--grpc-port", type=int, default=defaults.grpc)
    parser.add_argument("--metrics-port", type=int, default=defaults.metrics)
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG)
    parser.add_argument("--mps", action="store_true",
                        help="serve: run the GPU model processes under a private CUDA MPS daemon (facefuse/mps.py)")
    args = parser.parse_args(argv)
    if args.mps and args.action != "serve":
        parser.error("--mps works with `serve` (the daemon ends with the server)")
    ports = Ports(args.http_port, args.grpc_port, args.metrics_port)
    if args.action == "stop":
        if not PID_FILE.exists():
            print("[serve] no server started by `start` is recorded")
            return 0
        pid = int(PID_FILE.read_text())
        PID_FILE.unlink()
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            print(f"[serve] server pid {pid} was not running")
            return 0
        for _ in range(90):
            time.sleep(0.5)
            if not is_alive(pid):
                print(f"[serve] stopped server pid {pid}")
                break
        else:
            os.killpg(pid, signal.SIGKILL)
            print(f"[serve] killed server pid {pid} after 45 s")
        end_leftovers(pid)
        return 0
    with sigterm_as_interrupt():
        return _start_or_serve(args, ports)


def _start_or_serve(args: argparse.Namespace, ports: Ports) -> int:
    from facefuse.watchdog import SELF_HEAL_ARGS, StubWatchdog

    admin_secret = os.environ.get("TRITON_ADMIN_KEY")
    # Explicit model control lets the stub watchdog reload a model whose Python stub died (facefuse/watchdog.py).
    extra = [*SELF_HEAL_ARGS, *(restricted_api_args(admin_secret) if admin_secret else [])]
    mps = None
    if args.mps:
        from facefuse.mps import MpsUnavailable, start_mps

        try:
            mps = start_mps(REPO_ROOT / "out" / "mps")
        except MpsUnavailable as error:
            print(f"[serve] --mps: {error}", file=sys.stderr)
            return 1
        print(f"[serve] CUDA MPS daemon started (pipes in {mps.pipe_folder})", flush=True)
    try:
        # `start` returns while the server goes on; `serve` stays with it (and takes it along if killed).
        process = start(ports, args.log, extra=extra, environment=mps.environment() if mps else None,
                        die_with_parent=args.action == "serve")
    except RuntimeError as error:
        print(f"[serve] {error}", file=sys.stderr)
        if mps:
            mps.stop()
        return 1
    if args.action == "start":
        PID_FILE.parent.mkdir(parents=True, exist_ok=True)
        PID_FILE.write_text(str(process.pid))
        # The watchdog outlives this command and exits with the server; it logs into the server's log.
        with open(args.log, "ab") as log:
            subprocess.Popen([sys.executable, "-m", "facefuse.watchdog", "--server-pid", str(process.pid),
                              "--url", f"127.0.0.1:{ports.http}"], cwd=REPO_ROOT, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        return 0
    watchdog = StubWatchdog(process.pid, f"127.0.0.1:{ports.http}", admin_secret).start()
    try:
        return process.wait()
    except KeyboardInterrupt:
        return stop_process(process)
    finally:
        watchdog.stop()
        if mps:
            mps.stop()


if __name__ == "__main__":
    sys.exit(main())
