"""Benchmark plumbing that turns perf_analyzer's output into the committed figures."""

from __future__ import annotations

from pathlib import Path

from bench.run import composing_breakdown

REPORT = Path(__file__).resolve().parent.parent / "bench" / "results" / \
    "2026-11-29_H200_gpu-path_face_fusion_c64_perf_analyzer.txt"


def test_composing_breakdown_reads_each_model_of_the_ensemble_report():
    figures = composing_breakdown(REPORT.read_text())
    assert figures["preprocess_infer_ms"] == 1376.753 and figures["preprocess_queue_ms"] == 1005.062
    assert figures["fusion_infer_ms"] == 8.367 and figures["fusion_batch"] == round(320 / 72, 2)
    assert figures["postprocess_infer_ms"] == 333.149 and figures["postprocess_batch"] == round(322 / 30, 2)
    assert "face_fusion_infer_ms" not in figures  # the ensemble's own totals are not a composing model
    assert composing_breakdown("no report here") == {}
