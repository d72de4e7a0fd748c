"""The stubs' own batch timings (facefuse/execute_log.py) and their report (bench/execute_report.py)."""

from __future__ import annotations

import gc
import time

import pytest

from bench.execute_report import main as report_main
from bench.execute_report import summarise
from facefuse.execute_log import (
    CPU_STAGE,
    ENVIRONMENT_VARIABLE,
    GC_STAGE,
    BatchRecord,
    ExecuteLog,
    batch_stages,
    read_records,
)
from facefuse.hostmem import freeze_heap


def test_off_by_default_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    log = ExecuteLog("preprocess")
    with log.batch(3):
        log.note({"detect": 1.0})  # ignored when off
    assert not log.enabled and list(tmp_path.iterdir()) == []


def test_each_batch_is_one_line_with_its_wall_time_requests_and_stages(tmp_path, monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, str(tmp_path / "log"))
    log = ExecuteLog("postprocess")
    before = time.time()
    with log.batch(4):
        time.sleep(0.02)
        log.note({"paste": 2.5, "watermark": 7.0})
    with pytest.raises(ValueError), log.batch(1):  # a batch that fails is still timed, without stages
        raise ValueError("bad batch")
    log.close()
    first, second = read_records(tmp_path / "log")
    first_gc, second_gc = first.stages.pop(GC_STAGE), second.stages.pop(GC_STAGE)
    first_cpu, second_cpu = first.stages.pop(CPU_STAGE), second.stages.pop(CPU_STAGE)
    assert (first.model, first.requests, first.stages) == ("postprocess", 4, {"paste": 2.5, "watermark": 7.0})
    assert before <= first.start and 20.0 <= first.wall_ms < 1000.0
    assert (second.requests, second.stages) == (1, {})
    assert 0.0 <= first_gc < first.wall_ms and 0.0 <= second_gc <= second.wall_ms
    assert 0.0 <= first_cpu < 15.0 and second_cpu >= 0.0  # the 20 ms sleep waits: it uses no CPU
    assert read_records(tmp_path / "log", since=second.start)[0].start == second.start


def test_garbage_collections_during_a_batch_are_recorded(tmp_path):
    """A full collection inside a batch shows as its ``gc`` stage; the report leaves it out of the sum of stages
    (it happens within them) when it splits the slowest batches."""
    log = ExecuteLog("preprocess", folder=tmp_path)
    garbage = [[index] for index in range(200_000)]  # tracked objects for the collection to walk
    with log.batch(2):
        gc.collect()
        log.note({"detect": 1.0})
    log.close()
    del garbage
    (record,) = read_records(tmp_path)
    assert 0.0 < record.stages[GC_STAGE] <= record.wall_ms
    assert record.stages[GC_STAGE] <= record.stages[CPU_STAGE] + 5.0  # a collection is CPU work (clock granularity)
    figures = summarise([record], window_s=1.0)["preprocess"]
    assert figures["tail_outside_stages_ms"] == pytest.approx(record.wall_ms - 1.0)
    assert figures["tail_stage_gc_ms"] == pytest.approx(record.stages[GC_STAGE])


def test_freeze_heap_takes_what_lives_now_out_of_full_collections():
    try:
        frozen = freeze_heap()
        assert frozen > 1000 and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_batch_stages_sum_the_rows_share_of_each_stage():
    rows = [{"decode": 2.0, "detect": 5.0, "fusion": 1.0}, {"decode": 2.0, "detect": 5.0, "fusion": 1.0}]
    assert batch_stages(rows, ("decode", "detect", "mesh")) == {"decode": 4.0, "detect": 10.0}
    assert batch_stages([], ("decode",)) == {}


def test_summary_gives_each_models_batches_busy_share_and_stages(tmp_path):
    records = [BatchRecord("preprocess", 1, 0.0, 0.1, 8, {"detect": 40.0}),
               BatchRecord("preprocess", 2, 0.0, 0.3, 4, {"detect": 60.0}),
               BatchRecord("preprocess", 2, 0.32, 0.42, 4, {}),  # 20 ms after the same instance's last batch
               BatchRecord("fusion", 3, 0.5, 0.51, 12, {})]
    figures = summarise(records, window_s=1.0)
    assert figures["preprocess"]["batches"] == 3 and figures["preprocess"]["instances"] == 2
    assert figures["preprocess"]["requests_per_batch"] == pytest.approx(16 / 3)
    assert figures["preprocess"]["execute_mean_ms"] == pytest.approx(500 / 3)
    # As perf_analyzer's compute infer counts it: 8 requests saw 100 ms, 4 saw 300 ms and 4 saw 100 ms.
    assert figures["preprocess"]["execute_per_request_ms"] == pytest.approx((8 * 100 + 4 * 300 + 4 * 100) / 16)
    assert figures["preprocess"]["busy_percent"] == pytest.approx(25.0)  # 0.5 s of 2 instances x 1 s
    assert figures["preprocess"]["gap_p50_ms"] == pytest.approx(20.0)
    assert figures["preprocess"]["stage_detect_ms"] == pytest.approx(50.0)  # over the batches that report it
    assert figures["fusion"]["busy_percent"] == pytest.approx(1.0)
    # The slowest 1 %: here the one 300 ms batch (60 ms of it in detect, 240 outside any stage).
    assert figures["preprocess"]["tail_batches"] == 1 and figures["preprocess"]["tail_execute_ms"] == pytest.approx(300)
    assert figures["preprocess"]["tail_stage_detect_ms"] == pytest.approx(60.0)
    assert figures["preprocess"]["tail_outside_stages_ms"] == pytest.approx(240.0)
    assert "tail_outside_stages_ms" not in figures["fusion"]  # no stages: nothing to split


def test_report_command_reads_a_folder(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 1  # nothing logged: says so and fails
    assert "no batches logged" in capsys.readouterr().out
    log = ExecuteLog("fusion", folder=tmp_path)
    with log.batch(2):
        pass
    log.close()
    assert report_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fusion: 1 batches on 1 instances" in out and "slowest 1 % (1 batches)" in out


@pytest.mark.live
def test_bench_run_reports_every_served_models_batches(tmp_path):
    """The real server, perf_analyzer at concurrency 1 on the ensemble: each of the three stubs logged its batches,
    preprocess and postprocess with their stages."""
    from bench.run import main

    assert main(["--models", "face_fusion", "--concurrency", "1", "--measurement-ms", "1000", "--skip-baseline",
                 "--distinct-pairs", "2", "--warmup-requests", "4", "--execute-log", "--out", str(tmp_path),
                 "--machine", "test"]) == 0
    (path,) = tmp_path.glob("*_test_face_fusion_c1_execute.txt")
    text = path.read_text()
    for model in ("preprocess", "fusion", "postprocess"):
        assert f"\n{model}: " in "\n" + text
    assert "detect " in text and "watermark " in text
    assert "slowest 1 %" in text and "outside them" in text
