"""Benchmark plumbing that turns perf_analyzer's output into the committed figures."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.run import breakdown_line, composing_breakdown

REPORT = Path(__file__).resolve().parent.parent / "bench" / "results" / \
    "2026-11-29_H200_gpu-path_face_fusion_c64_perf_analyzer.txt"


def test_composing_breakdown_reads_each_model_of_the_ensemble_report():
    figures = composing_breakdown(REPORT.read_text())
    assert figures["preprocess_infer_ms"] == 1376.753 and figures["preprocess_queue_ms"] == 1005.062
    assert figures["fusion_infer_ms"] == 8.367 and figures["fusion_batch"] == round(320 / 72, 2)
    assert figures["postprocess_infer_ms"] == 333.149 and figures["postprocess_batch"] == round(322 / 30, 2)
    assert figures["preprocess_input_ms"] == 6.934 and figures["preprocess_output_ms"] == 55.853
    assert figures["fusion_input_ms"] == 1.749 and figures["postprocess_output_ms"] == 8.999
    assert "face_fusion_infer_ms" not in figures  # the ensemble's own totals are not a composing model
    assert composing_breakdown("no report here") == {}
    line = breakdown_line(figures)
    assert "preprocess queue 1005.1, in 6.9, compute 1376.8, out 55.9 (batch " in line and line.count(";") == 2
    assert breakdown_line({"throughput_per_s": 1.0}) == ""


def test_tuned_repository_edits_every_config_the_server_may_read(tmp_path):
    """`--instances` / `--cpu-threads` / `--queue-delay-us` reach every config the server may read (config.pbtxt,
    and configs/gpu.pbtxt under --model-config-name=gpu), or a bench of the tuned copy would measure the untuned
    config under the tuned name."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from bench.repository import parse_parameters, tuned_repository

    copy = tuned_repository(tmp_path / "repository", {"preprocess": 3, "fusion": 2}, {"preprocess": 5000},
                            cpu_threads={"preprocess": 1, "fusion": 1},
                            parameters=parse_parameters(["preprocess.detector_max_side=1280"]))
    for path in [copy / "preprocess" / "config.pbtxt", *sorted((copy / "preprocess" / "configs").glob("*.pbtxt")),
                 copy / "fusion" / "config.pbtxt", copy / "fusion" / "configs" / "gpu.pbtxt"]:
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.instance_group[0].count == (3 if config.name == "preprocess" else 2), path
        if config.name == "preprocess":
            assert config.dynamic_batching.max_queue_delay_microseconds == 5000, path
            assert config.parameters["detector_max_side"].string_value == "1280", path
            assert config.parameters["consent"].string_value in ("off", "required"), path  # others untouched
        if config.backend == "python":
            assert config.parameters["cpu_threads"].string_value == "1", path
    assert len(list((copy / "preprocess" / "configs").glob("*.pbtxt"))) == 1
    # A smaller max batch: the model's configs, its preferred sizes above it dropped, and the ensemble's lowered.
    smaller = tuned_repository(tmp_path / "smaller", {}, {}, max_batch_sizes={"preprocess": 4, "fusion": 12})
    configs = {path: text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
               for path in smaller.glob("*/**/*.pbtxt")}
    sizes = {(path.parent.name if path.name == "config.pbtxt" else path.parent.parent.name, path.name):
             config.max_batch_size for path, config in configs.items()}
    assert sizes[("preprocess", "config.pbtxt")] == sizes[("preprocess", "gpu.pbtxt")] == 4
    assert sizes[("fusion", "config.pbtxt")] == sizes[("fusion", "gpu.pbtxt")] == 12
    assert sizes[("face_fusion", "config.pbtxt")] == 4 and sizes[("postprocess", "config.pbtxt")] == 8
    fusion_gpu = configs[smaller / "fusion" / "configs" / "gpu.pbtxt"]
    assert list(fusion_gpu.dynamic_batching.preferred_batch_size) == [8]
    # A larger one (the configs' 8 raised to measure against it): the ensemble follows the smallest model it runs.
    larger = tuned_repository(tmp_path / "larger", {}, {}, max_batch_sizes={"preprocess": 16, "postprocess": 16})
    sizes = {path: text_format.Parse(path.read_text(), model_config_pb2.ModelConfig()).max_batch_size
             for path in larger.glob("*/**/*.pbtxt")}
    assert {path.relative_to(larger).as_posix(): size for path, size in sizes.items() if size != 32} == {
        "preprocess/config.pbtxt": 16, "preprocess/configs/gpu.pbtxt": 16, "postprocess/config.pbtxt": 16,
        "postprocess/configs/gpu.pbtxt": 16, "face_fusion/config.pbtxt": 16}
    only_preprocess = tuned_repository(tmp_path / "one", {}, {}, max_batch_sizes={"preprocess": 16})
    assert "max_batch_size: 8\n" in (only_preprocess / "face_fusion" / "config.pbtxt").read_text()  # postprocess's
    with pytest.raises(ValueError, match="TensorRT plan"):  # its engine's profile ends at 32
        tuned_repository(tmp_path / "plan", {}, {}, max_batch_sizes={"fusion": 64})
    with pytest.raises(ValueError, match="expected one match"):  # only parameters the config has
        tuned_repository(tmp_path / "again", {}, {}, parameters={"preprocess": {"no_such_key": "1"}})
    with pytest.raises(ValueError, match="model.parameter=value"):
        parse_parameters(["detector_max_side=1280"])


def test_stall_probe_turns_cumulative_statistics_into_intervals_and_finds_quiet_spans():
    from bench.stall_probe import cumulative, deltas, stalls

    def stats(rows: int, executions: int, queue_ns: int) -> dict:
        return {"model_stats": [{"name": "face_fusion", "version": "1", "execution_count": executions,
                                 "inference_count": rows,
                                 "inference_stats": {"queue": {"count": rows, "ns": queue_ns}}}]}

    counts = [0, 4, 8, 8, 8, 8, 12, 12]  # completions by sample; nothing between 1.5 s and 2.5 s, then again at 3.5
    samples = [(10.0 + 0.5 * k, cumulative(stats(rows, rows // 2, rows * 1_000_000))) for k, rows in enumerate(counts)]
    rows = deltas(samples)
    assert [row["rows"] for row in rows] == [4, 4, 0, 0, 0, 4, 0]
    assert rows[0]["t"] == 0.5 and rows[0]["executions"] == 2 and rows[0]["queue_ms"] == 4.0
    assert stalls(rows, min_seconds=1.0) == [(1.0, 2.5)]
    assert stalls(rows, min_seconds=0.5) == [(1.0, 2.5), (3.0, 3.5)]
    assert stalls(rows, min_seconds=2.0) == []


def test_first_calls_times_a_new_batch_size_twice(capsys):
    """bench.first_calls on the CPU: one line per size with both calls and every preprocess stage."""
    import re

    from bench import first_calls

    assert first_calls.main(["--device", "cpu", "--sizes", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[first-calls] 1 requests")]
    assert len(lines) == 1
    match = re.search(r"first (\d+) ms .*second (\d+) ms", lines[0])
    assert match and int(match.group(1)) > 0 and int(match.group(2)) > 0
    for stage in ("decode", "detect", "align", "mesh", "geometry"):
        assert lines[0].count(f"'{stage}'") == 2, stage


def test_gpu_instance_counts_are_the_gpu_configs_counts():
    """`bench.run --instances gpu` measures what docker compose serves: each GPU model's count in its GPU config."""
    from bench.repository import gpu_config_counts
    from tests.test_multi_gpu import source_config

    counts = gpu_config_counts()
    assert set(counts) == {"preprocess", "fusion", "postprocess"}
    for model, count in counts.items():
        assert count == sum(group.count for group in source_config(model).instance_group) >= 1
    assert counts["preprocess"] > 2  # the measured choice (README Benchmarks), above config.pbtxt's two for a CPU


def test_gpu_sweep_serves_the_gpu_configs_counts_threads_and_delays(tmp_path):
    """`--instances gpu` starts from config.pbtxt (the CPU host's threads and delays) and must still serve each GPU
    config's instance count, `cpu_threads` and batching delay: the copy it serves matches configs/gpu.pbtxt."""
    from bench.repository import gpu_config_counts, gpu_config_cpu_threads, gpu_config_queue_delays, tuned_repository
    from deploy.multi_gpu import load_config
    from tests.test_multi_gpu import source_config

    threads, delays = gpu_config_cpu_threads(), gpu_config_queue_delays()
    assert threads.get("preprocess") == 2  # differs from config.pbtxt's 1: the case this guards
    assert delays["preprocess"] == 0  # differs from config.pbtxt's 2000
    served = tuned_repository(tmp_path / "repo", gpu_config_counts(), delays, cpu_threads=threads)
    for model in ("preprocess", "fusion", "postprocess"):
        config, expected = load_config(served / model / "config.pbtxt"), source_config(model)
        assert sum(g.count for g in config.instance_group) == sum(g.count for g in expected.instance_group), model
        assert (config.dynamic_batching.max_queue_delay_microseconds
                == expected.dynamic_batching.max_queue_delay_microseconds), model
        if "cpu_threads" in expected.parameters:
            assert config.parameters["cpu_threads"] == expected.parameters["cpu_threads"], model


def test_cpu_time_of_a_process_and_the_machine_are_read_from_proc():
    from facefuse.procfs import cpu_seconds, machine_cpu_seconds

    before, (busy_before, total_before) = cpu_seconds(os.getpid()), machine_cpu_seconds()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn 0.3 s of CPU in this process
        pass
    after, (busy_after, total_after) = cpu_seconds(os.getpid()), machine_cpu_seconds()
    assert after - before >= 0.2
    # A fully busy machine makes busy == total: the two differences may then differ by float rounding (ticks are
    # hundredths of a second, summed over the cores).
    assert busy_after - busy_before >= 0.2 and total_after - total_before >= busy_after - busy_before - 1e-6
    assert cpu_seconds(2 ** 22 + 12345) is None  # no such process


def test_cpu_cores_divides_each_parts_cpu_time_by_the_wall_time():
    from bench.run import cpu_cores

    before = {"server": 10.0, "preprocess": 5.0, "perf_analyzer": 1.0, "machine_busy": 100.0,
              "machine_total": 400.0, "clock": 50.0}
    after = {"server": 12.0, "preprocess": 13.0, "perf_analyzer": 2.0, "postprocess": 4.0, "machine_busy": 140.0,
             "machine_total": 480.0, "clock": 54.0}
    cores = cpu_cores(before, after)
    assert cores["cpu_server_cores"] == 0.5 and cores["cpu_preprocess_cores"] == 2.0
    assert cores["cpu_postprocess_cores"] == 1.0  # a stub first seen in the second snapshot (started meanwhile)
    assert cores["cpu_perf_analyzer_cores"] == 0.25
    assert cores["cpu_machine_busy_cores"] == round(40 / 80 * os.cpu_count(), 2)
    assert cores["cpu_threads"] == ""  # snapshots without thread figures


def test_cpu_cores_names_each_models_busiest_thread_groups():
    from bench.run import cpu_cores

    common = {"server": 0.0, "machine_busy": 0.0, "machine_total": 1.0}
    before = {**common, "clock": 0.0, "threads": {"preprocess": {"python": 1.0, "cuda-EvtHandlr": 0.0}}}
    after = {**common, "clock": 2.0, "threads": {"preprocess": {"python": 2.0, "cuda-EvtHandlr": 3.0, "idle": 0.05},
                                                 "fusion": {"python": 0.01}}}
    assert cpu_cores(before, after)["cpu_threads"] == "fusion: -; preprocess: cuda-EvtHandlr 1.50, python 0.50"


def test_thread_cpu_seconds_groups_a_processes_threads_by_name():
    """A live thread of this process named "burner-12" (its OS name, as CUDA or OpenMP name their threads) burns
    CPU: its time shows under "burner-#", the thread numbering folded, and by its thread id under its own name."""
    import ctypes
    import threading

    from facefuse.procfs import thread_cpu_by_id, thread_cpu_seconds

    done = threading.Event()
    named = threading.Event()
    thread_ids = []

    def linger() -> None:
        thread_ids.append(threading.get_native_id())
        ctypes.CDLL(None).prctl(15, b"burner-12", 0, 0, 0)
        deadline = time.thread_time() + 0.3
        while time.thread_time() < deadline:
            pass
        named.set()
        done.wait(30)

    worker = threading.Thread(target=linger)
    worker.start()
    try:
        assert named.wait(30)
        totals = thread_cpu_seconds(os.getpid())
        assert totals.get("burner-#", 0.0) >= 0.2, totals
        assert "burner-12" not in totals
        assert "main" in totals  # this process's own thread, by that name whatever it is called
        by_id = thread_cpu_by_id(os.getpid())
        name, seconds = by_id[thread_ids[0]]
        assert name == "burner-12" and seconds >= 0.2, by_id
        assert os.getpid() in by_id and sum(value for _, value in by_id.values()) >= seconds
    finally:
        done.set()
        worker.join(timeout=30)
    assert thread_cpu_seconds(2 ** 22 + 12345) == {} == thread_cpu_by_id(2 ** 22 + 12345)  # no such process


def test_cpu_cores_names_the_busiest_single_threads_of_server_and_mps_server():
    """A saturated single thread is named with its process (a thread that started between the snapshots counts
    from zero); idle ones and all but the busiest BUSIEST_THREADS are left out."""
    from bench.run import BUSIEST_THREADS, cpu_cores

    common = {"server": 0.0, "machine_busy": 0.0, "machine_total": 1.0}
    before = {**common, "clock": 0.0, "mps_server": 1.0,
              "single_threads": {"server/7": ("tritonserver", 5.0), "server/8": ("grpcpp_sync_ser", 1.0),
                                 "mps-server/9": ("nvidia-cuda-mps", 2.0)}}
    after = {**common, "clock": 2.0, "mps_server": 2.9,
             "single_threads": {"server/7": ("tritonserver", 6.9), "server/8": ("grpcpp_sync_ser", 1.05),
                                "mps-server/9": ("nvidia-cuda-mps", 3.8), "server/11": ("tritonserver", 0.6),
                                **{f"server/{tid}": ("pool", 0.2) for tid in range(20, 26)}}}
    cores = cpu_cores(before, after)
    assert cores["cpu_mps_server_cores"] == 0.95
    names = cores["cpu_busiest_threads"].split(", ")
    assert names[:3] == ["server tritonserver 0.95", "mps-server nvidia-cuda-mps 0.90", "server tritonserver 0.30"]
    assert len(names) == BUSIEST_THREADS and names[3] == "server pool 0.10"
    assert "grpcpp" not in cores["cpu_busiest_threads"]  # 0.025 cores: below the 0.05 shown


def test_a_level_without_measurement_keeps_its_reason_beside_the_results(tmp_path):
    from bench.run import record_failure

    error = RuntimeError("perf_analyzer failed for face_fusion at concurrency 64:\n\nFailed to obtain stable "
                         "measurement within 10 windows")
    entry = record_failure(tmp_path, "2026-12-07_H100-x", "face_fusion", 64, error)
    assert entry == {"model": "face_fusion", "concurrency": 64,
                     "reason": "perf_analyzer failed for face_fusion at concurrency 64:",
                     "file": "2026-12-07_H100-x_face_fusion_c64_failed.txt"}
    assert "Failed to obtain stable measurement" in (tmp_path / entry["file"]).read_text()


def test_a_failed_perf_analyzer_run_keeps_its_whole_output(tmp_path):
    """The error's message keeps only perf_analyzer's tail; the file beside the results keeps every pass."""
    from bench.run import PerfAnalyzerFailed, record_failure

    passes = "".join(f"Pass [{number}] throughput: {number}.0 infer/sec\n" for number in range(1, 11))
    error = PerfAnalyzerFailed("perf_analyzer failed for preprocess at concurrency 8:\n...", output=passes)
    entry = record_failure(tmp_path, "tag", "preprocess", 8, error)
    text = (tmp_path / entry["file"]).read_text()
    assert "Pass [1] throughput" in text and "Pass [10] throughput" in text
    assert entry["reason"] == "perf_analyzer failed for preprocess at concurrency 8:"


def test_rows_are_written_with_model_and_concurrency_first(tmp_path):
    import csv

    from bench.run import write_rows

    path = tmp_path / "perf.csv"
    write_rows([{"p50_ms": 5.0, "model": "face_fusion", "concurrency": 1},
                {"model": "face_fusion", "concurrency": 16, "p50_ms": 9.0, "cpu_server_cores": 0.2}], path)
    with open(path) as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames[:2] == ["model", "concurrency"]
    assert [row["concurrency"] for row in rows] == ["1", "16"] and rows[0]["cpu_server_cores"] == ""


def test_profile_request_reports_each_stages_wall_time_and_gpu_work(capsys):
    """bench.profile_request on the CPU (CI has no GPU; the host waits are counted on CUDA only): both stages run
    as served and report their time."""
    from bench.profile_request import main

    assert main(["--device", "cpu", "--repeats", "1", "--rows", "1,2", "--by-operator", "--by-kernel",
                 "--python-profile"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[request]")]
    walls = [line for line in lines if "wall" in line]
    assert [line.split(":")[0] for line in walls] == [
        "[request] preprocess 1 row", "[request] postprocess 1 row",
        "[request] preprocess 2 rows", "[request] postprocess 2 rows"]
    assert all(float(line.split(": ")[1].split(" ms")[0]) > 0 for line in walls)
    # Each stage's time per row, from the rows' own timings.
    assert all("'detect'" in line for line in walls[0::2]) and all("'watermark'" in line for line in walls[1::2])
    assert sum("kernel launches" in line for line in lines) == 4
    # --by-operator: operators with their input shapes and own time (CPU time on a CPU device).
    operators = [line for line in lines if line.startswith("[request]     CPU")]
    assert operators and all("aten::" in line and "[[" in line for line in operators)
    # --by-kernel: every event the device ran by name (the CPU's events on a CPU device), largest first.
    kernels = [line for line in lines if line.startswith("[request]     kernel")]
    assert 4 <= len(kernels) <= 4 * 15
    first = [float(line.split()[2]) for line in kernels[:2]]
    assert first[0] >= first[1] > 0
    # --python-profile: cProfile's table per call, our functions among its rows.
    python_rows = [line for line in lines if line.startswith("[request]   py ")]
    assert sum("function calls" in line for line in python_rows) == 4
    assert any("facefuse/" in line for line in python_rows)


def test_side_by_side_ratios_pair_each_level_measured_by_both():
    from bench.side_by_side import _without, ratios, unpaired

    new = [{"model": "face_fusion", "concurrency": 1, "throughput_per_s": 30.0, "p50_ms": 30.0, "p99_ms": 40.0},
           {"model": "face_fusion", "concurrency": 16, "throughput_per_s": 200.0, "p50_ms": 70.0, "p99_ms": 120.0}]
    old = [{"model": "face_fusion", "concurrency": "1", "throughput_per_s": 20.0, "p50_ms": 40.0, "p99_ms": 50.0}]
    (only,) = ratios(new, old)  # c=16 was not measured by the revision: no ratio
    assert (only["model"], only["concurrency"]) == ("face_fusion", 1)
    assert (only["ratio_throughput_per_s"], only["ratio_p50_ms"], only["ratio_p99_ms"]) == (1.5, 0.75, 0.8)
    assert unpaired(new, old) == [("face_fusion", 16, "new")]  # said in the report, not left out
    assert unpaired(old, new) == [("face_fusion", 16, "rev")] and unpaired(new, new) == []
    passed = ["--models", "fusion", "--profile-stubs", "--out", "x", "--machine=m", "--profile-stubs", "wall", "-c"]
    assert _without(_without(_without(passed, "--out"), "--machine"), "--profile-stubs", ("busy", "wall")) == [
        "--models", "fusion", "-c"]


def test_side_by_side_rounds_alternate_who_goes_first_and_report_the_median(tmp_path, monkeypatch, capsys):
    # bench.run stood in for by a function writing each run's summary (the live test below runs the real one).
    import csv
    import datetime
    import json

    from bench import side_by_side

    runs = []
    throughput = {"new": iter([30.0, 36.0, 33.0]), "tree-base": iter([30.0, 30.0, 30.0])}

    def fake_run(command, cwd, env, check):
        tag = command[command.index("--machine") + 1]
        side = "new" if "-new-" in tag else "tree-base"
        runs.append(tag)
        rows = [{"model": "face_fusion", "concurrency": 1, "throughput_per_s": next(throughput[side]),
                 "p50_ms": 30.0, "p99_ms": 40.0}]
        if tag == "m-new-r3":  # round 3's other run stops before c=128 (a time limit)
            rows.append({"model": "face_fusion", "concurrency": 128, "throughput_per_s": 900.0, "p50_ms": 130.0,
                         "p99_ms": 190.0})
        (tmp_path / f"{datetime.date.today().isoformat()}_{tag}_summary.json").write_text(json.dumps({"rows": rows}))

    monkeypatch.setattr(side_by_side.subprocess, "run", fake_run)
    base = tmp_path / "base"
    base.mkdir()
    assert side_by_side.main(["--tree", str(base), "--out", str(tmp_path), "--machine", "m", "--rounds", "3",
                              "--", "--concurrency", "1"]) == 0
    assert runs == ["m-new-r1", "m-tree-base-r1", "m-tree-base-r2", "m-new-r2", "m-new-r3", "m-tree-base-r3"]
    out = capsys.readouterr().out
    assert "median over 3 rounds 1.100x" in out  # ratios 1.0, 1.2, 1.1
    assert "round 3: face_fusion c=128: measured by new only" in out and "c=128: median" not in out
    with open(next(tmp_path.glob("*_m_side_by_side.csv"))) as handle:
        assert [row["round"] for row in csv.DictReader(handle)] == ["1", "2", "3"]


def test_side_by_side_env_serves_this_checkout_with_and_without_a_setting(tmp_path, monkeypatch, capsys):
    # bench.run stood in for by a function recording each run's environment and writing its summary.
    import datetime
    import json

    from bench import side_by_side

    seen = []

    def fake_run(command, cwd, env, check):
        tag = command[command.index("--machine") + 1]
        seen.append((tag, Path(cwd), env.get("FACEFUSE_FUSED_KERNELS")))
        rows = [{"model": "face_fusion", "concurrency": 128, "p50_ms": 30.0, "p99_ms": 40.0,
                 "throughput_per_s": 600.0 if env.get("FACEFUSE_FUSED_KERNELS") == "off" else 660.0}]
        (tmp_path / f"{datetime.date.today().isoformat()}_{tag}_summary.json").write_text(json.dumps({"rows": rows}))

    monkeypatch.delenv("FACEFUSE_FUSED_KERNELS", raising=False)
    monkeypatch.setattr(side_by_side.subprocess, "run", fake_run)
    assert side_by_side.main(["--env", "FACEFUSE_FUSED_KERNELS=off", "--out", str(tmp_path), "--machine", "m",
                              "--rounds", "2", "--", "--concurrency", "128"]) == 0
    assert [(tag, value) for tag, _, value in seen] == [
        ("m-new-r1", None), ("m-env-FACEFUSE_FUSED_KERNELS-off-r1", "off"),
        ("m-env-FACEFUSE_FUSED_KERNELS-off-r2", "off"), ("m-new-r2", None)]
    assert {cwd for _, cwd, _ in seen} == {side_by_side.REPO_ROOT}
    assert "median over 2 rounds 1.100x" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        side_by_side.main(["--env", "FACEFUSE_FUSED_KERNELS", "--", "--concurrency", "1"])


def test_side_by_side_args_give_only_the_other_side_more_bench_run_arguments(tmp_path, monkeypatch, capsys):
    import datetime
    import json

    from bench import side_by_side

    seen = []

    def fake_run(command, cwd, env, check):
        tag = command[command.index("--machine") + 1]
        bounded = "--max-batch" in command
        seen.append((tag, bounded))
        rows = [{"model": "face_fusion", "concurrency": 64, "p50_ms": 30.0, "p99_ms": 80.0 if bounded else 100.0,
                 "throughput_per_s": 500.0}]
        (tmp_path / f"{datetime.date.today().isoformat()}_{tag}_summary.json").write_text(json.dumps({"rows": rows}))

    monkeypatch.setattr(side_by_side.subprocess, "run", fake_run)
    assert side_by_side.main(["--args", "--max-batch preprocess=16,postprocess=16", "--out", str(tmp_path),
                              "--machine", "m", "--", "--concurrency", "64"]) == 0
    assert seen == [("m-new", False), ("m-args-max-batch-preprocess-16-postprocess-16", True)]
    assert "p99 100.0 vs 80.0 ms" in capsys.readouterr().out


@pytest.mark.live
def test_side_by_side_serves_this_checkout_and_a_revision_and_writes_their_ratios(tmp_path):
    """The real thing, small: the fusion model of this checkout and of HEAD (git archive), each served by the real
    Triton and measured by perf_analyzer at concurrency 1; the CSV pairs them."""
    import csv

    from bench.side_by_side import main

    assert main(["--rev", "HEAD", "--out", str(tmp_path), "--machine", "test", "--", "--models", "fusion",
                 "--concurrency", "1", "--measurement-ms", "1000", "--skip-baseline", "--distinct-pairs", "2",
                 "--warmup-requests", "4", "--profile-stubs"]) == 0
    (path,) = tmp_path.glob("*_test_side_by_side.csv")
    with open(path) as handle:
        (row,) = list(csv.DictReader(handle))
    assert (row["model"], row["concurrency"]) == ("fusion", "1")
    assert float(row["new_throughput_per_s"]) > 0 and float(row["rev_throughput_per_s"]) > 0
    assert float(row["ratio_throughput_per_s"]) == pytest.approx(
        float(row["new_throughput_per_s"]) / float(row["rev_throughput_per_s"]), rel=1e-2)
    for side in ("new", "rev-*"):
        assert len(list(tmp_path.glob(f"*_test-{side}_summary.json"))) == 1


def test_gpu_sampler_reads_peak_memory_and_mean_busy_share(tmp_path):
    """bench.gpu_monitor: nvidia-smi's csv line parsed; the sampler keeps the peak memory and the mean busy share of
    what its command answered (a stand-in script here, answering like nvidia-smi: CI has no GPU); nothing where the
    command is missing."""
    from bench.gpu_monitor import GpuSampler, parse_sample

    assert parse_sample("81234, 57\n") == (81234.0, 57.0)
    assert parse_sample("No devices were found") is None and parse_sample("") is None
    answers = tmp_path / "answers"
    answers.write_text("1000, 10\n3000, 30\n2000, 20\n")
    stand_in = tmp_path / "smi"
    # Each call answers the next line (the last one again once all were used).
    stand_in.write_text(f"#!/bin/sh\nline=$(head -n1 {answers})\n[ $(wc -l < {answers}) -gt 1 ] && "
                        f"sed -i 1d {answers}\necho \"$line\"\n")
    stand_in.chmod(0o755)
    sampler = GpuSampler(interval_s=0.01, command=[str(stand_in)]).start()
    deadline = time.monotonic() + 10
    while len(sampler.samples) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    figures = sampler.stop()
    assert figures["gpu_memory_peak_mib"] == 3000.0
    assert sampler.samples[:3] == [(1000.0, 10.0), (3000.0, 30.0), (2000.0, 20.0)]
    busy = [b for _, b in sampler.samples]
    assert figures["gpu_busy_percent"] == round(sum(busy) / len(busy), 1)
    assert GpuSampler(command=[str(tmp_path / "missing")]).start().stop() == {}


def test_cpu_scaling_reports_each_process_count_against_the_first():
    from bench.cpu_scaling import scaling

    speeds = scaling([1, 2], 0.3)
    assert [count for count, _ in speeds] == [1, 2]
    assert speeds[0][1] == 1.0 and 0.2 < speeds[1][1] < 2.0  # two processes on a host of >= 1 core


def test_host_contention_runs_workers_together_and_appends_a_csv_row_per_count(tmp_path, capsys):
    from bench.host_contention import main

    table = tmp_path / "contention.csv"
    assert main(["--processes", "1,2", "--rows", "1", "--seconds", "0.5", "--device", "cpu", "--label", "t",
                 "--csv", str(table)]) == 0
    printed = capsys.readouterr().out
    assert "[contention] 1 process (served env, cpu, t)" in printed and "[contention] 2 processes" in printed
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["processes"] for row in rows] == ["1", "2"]
    for row in rows:
        assert int(row["batches"]) >= int(row["processes"]) and float(row["wall_ms_per_row"]) > 0
        assert {"decode", "detect", "align"} <= set(json.loads(row["stages_ms_per_row"]))


def test_host_contention_decodes_alone_when_asked(tmp_path, capsys):
    from bench.host_contention import main

    table = tmp_path / "contention.csv"
    assert main(["--processes", "1", "--rows", "2", "--seconds", "0.3", "--device", "cpu", "--stage", "decode",
                 "--csv", str(table)]) == 0
    assert "[contention] 1 process (served env, cpu, decode alone), 2 rows a batch" in capsys.readouterr().out
    with table.open() as handle:
        (row,) = list(csv.DictReader(handle))
    # Only the decode ran: no detector stage, and the decode's time per row is the row's whole wall time.
    stages = json.loads(row["stages_ms_per_row"])
    assert set(stages) == {"decode"} and row["stage"] == "decode"
    assert 0 < stages["decode"] <= float(row["wall_ms_per_row"]) * 1.05 + 0.05


def test_host_contention_names_a_worker_that_never_got_ready(monkeypatch, tmp_path):
    from bench import host_contention

    monkeypatch.setattr(host_contention.sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError, match="worker 1 of 1 did not get ready"):
        host_contention.run_together(1, 1, 0.1, "plain", "cpu")
    # One that hangs while loading: given up after the start-up limit, and killed.
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nsleep 60\n")
    hang.chmod(0o755)
    monkeypatch.setattr(host_contention.sys, "executable", str(hang))
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="nothing within the start-up limit"):
        host_contention.run_together(1, 1, 0.1, "plain", "cpu", startup_s=0.5)
    assert time.perf_counter() - started < 10


def test_profile_decode_times_a_batch_per_photo_and_names_a_photo_that_fails():
    from bench.inputs import benchmark_pair
    from bench.profile_decode import decode_times

    photos = list(benchmark_pair())
    wall_ms, cpu_ms, returned_ms = decode_times(photos, "cpu", 2)
    assert wall_ms > 0 and cpu_ms > 0 and 0 < returned_ms <= wall_ms  # Pillow returns when it is done
    with pytest.raises(RuntimeError, match="1 of 2 photos did not decode"):
        decode_times([photos[0], b"not a jpeg"], "cpu", 1)


def test_profile_decode_prints_its_figure(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "bench.profile_decode", "--device", "cpu", "--photos", "2",
                             "--repeats", "2"], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    assert "[decode] 2 1080p photos per call on cpu (Pillow on the host):" in result.stdout
    assert "ms CPU, call returned after" in result.stdout and "per photo" in result.stdout


def test_explicit_counts_on_a_gpu_host_serve_the_gpu_configs_delays_and_threads():
    """Counts alone used to keep config.pbtxt's CPU-host delays (2 / 1 / 2 ms) and threads on a GPU host; now the
    GPU configs' apply wherever the models run on a GPU, explicit delays and threads still win, and a CPU host
    keeps config.pbtxt's."""
    from bench.repository import gpu_config_counts, gpu_config_cpu_threads, gpu_config_queue_delays, served_settings

    counts, delays, threads = served_settings("preprocess=8,postprocess=6", "", "", on_gpu=True)
    assert counts == {"preprocess": 8, "postprocess": 6}
    assert delays == gpu_config_queue_delays() and delays["preprocess"] == 0
    assert threads == gpu_config_cpu_threads() and threads["preprocess"] == 2
    counts, delays, threads = served_settings("preprocess=8", "fusion=500", "postprocess=3", on_gpu=True)
    assert delays == {**gpu_config_queue_delays(), "fusion": 500} and threads["postprocess"] == 3
    assert served_settings("preprocess=8", "", "", on_gpu=False) == ({"preprocess": 8}, {}, {})
    counts, delays, threads = served_settings("gpu", "", "", on_gpu=False)  # asked for by name on any host
    assert counts == gpu_config_counts() and delays["postprocess"] == 0 and threads == gpu_config_cpu_threads()


def test_served_configs_record_what_the_server_reads(tmp_path):
    # The summary's record of the served settings comes from the configs themselves: the CPU host's as shipped,
    # and in a tuned copy with the GPU configs' settings exactly those.
    from bench.repository import gpu_config_cpu_threads, served_configs, served_settings, tuned_repository

    shipped = served_configs()
    assert shipped["preprocess"]["queue_delay_us"] == 2000 and shipped["preprocess"]["cpu_threads"] == 1
    assert shipped["face_fusion"] == {"max_batch_size": shipped["preprocess"]["max_batch_size"]}
    counts, delays, threads = served_settings("preprocess=6,postprocess=5", "", "", on_gpu=True)
    served = served_configs(tuned_repository(tmp_path / "repo", counts, delays, cpu_threads=threads))
    assert served["preprocess"]["instances"] == 6 and served["postprocess"]["instances"] == 5
    assert {model: served[model]["queue_delay_us"] for model in delays} == delays
    assert served["preprocess"]["cpu_threads"] == gpu_config_cpu_threads()["preprocess"]
    assert served["fusion"]["instances"] == shipped["fusion"]["instances"]


def test_config_settings_read_as_text_equal_the_protobuf_reading():
    # bench.repository reads configs as plain text (the GPU host has no tritonclient): every shipped config, CPU host
    # and GPU, must read the same as through Triton's protobufs.
    from bench.repository import config_settings
    from deploy.multi_gpu import load_config
    from facefuse.local_server import MODEL_REPOSITORY

    paths = sorted(MODEL_REPOSITORY.glob("*/config.pbtxt")) + sorted(MODEL_REPOSITORY.glob("*/configs/*.pbtxt"))
    assert len(paths) >= 7
    for path in paths:
        config = load_config(path)
        expected = {"max_batch_size": config.max_batch_size}
        if config.platform != "ensemble":
            expected["instances"] = sum(group.count for group in config.instance_group) or 1
        if config.HasField("dynamic_batching"):
            expected["queue_delay_us"] = config.dynamic_batching.max_queue_delay_microseconds
        if "cpu_threads" in config.parameters:
            expected["cpu_threads"] = int(config.parameters["cpu_threads"].string_value)
        assert config_settings(path.read_text()) == expected, path


def test_gpu_settings_are_read_without_tritonclient():
    # The device tool's GPU host lacks tritonclient's Python package: bench.run's settings must not need it there.
    script = ("import sys; sys.modules['tritonclient'] = None; sys.modules['google.protobuf'] = None\n"
              "from bench.repository import served_configs, served_settings\n"
              "counts, delays, threads = served_settings('preprocess=6', '', '', on_gpu=True)\n"
              "print(delays['preprocess'], threads['preprocess'], served_configs()['preprocess']['instances'])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "2", "2"]


def test_handover_probe_writes_configs_the_server_reads_and_prices_one_more_tensor(tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from bench.handover_probe import per_tensor_ms, probe_repository

    models = probe_repository(tmp_path, [1, 3], "cuda")
    assert models == {1: ("producer_k1", "chain_k1"), 3: ("producer_k3", "chain_k3")}
    producer, consumer, chain = (text_format.Parse((tmp_path / name / "config.pbtxt").read_text(),
                                                   model_config_pb2.ModelConfig())
                                 for name in ("producer_k3", "consumer_k3", "chain_k3"))
    assert [output.name for output in producer.output] == ["OUT_0", "OUT_1", "OUT_2"]
    assert producer.input[0].data_type == model_config_pb2.TYPE_STRING  # the payload: BYTES, as the JPEGs
    assert producer.parameters["device"].string_value == "cuda"
    assert [tensor.name for tensor in consumer.input] == ["OUT_0", "OUT_1", "OUT_2"]
    assert consumer.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"  # CUDA tensors stay on the GPU
    assert [step.model_name for step in chain.ensemble_scheduling.step] == ["producer_k3", "consumer_k3"]
    # 1000 requests/s with one tensor, 500 with three: 1 ms more per request for two more tensors.
    assert per_tensor_ms({1: 1000.0, 3: 500.0}) == pytest.approx(0.5)
    assert per_tensor_ms({1: 1000.0}) is None


def test_handover_probe_measures_the_real_server(tmp_path):
    command = [sys.executable, "-m", "bench.handover_probe", "--outputs", "1,3", "--concurrency", "2",
               "--measurement-ms", "1000", "--input-kb", "64", "--folder", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for model in ("producer_k1", "chain_k1", "producer_k3", "chain_k3"):
        assert f"[handover] {model}: " in result.stdout and "requests/s" in result.stdout
    assert "one more tensor per request out of one model: " in result.stdout
    assert "one more tensor per request from one model into the next: " in result.stdout
    assert "[handover] producer_k1 with 64 KB in per request: " in result.stdout
    assert "an input of 64 KB per request instead of 1 byte: " in result.stdout
    assert result.stdout.count("server ms per request: queue ") == 5  # four models, then the large input
