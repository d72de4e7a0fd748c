"""build/int8.py on the CPU: the calibration set (real preprocessed faces, augmented, seeded, split), the calibrator's
data loader against a freshly exported ONNX graph, the accuracy report's arithmetic, and the no-TensorRT exit."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from build import int8
from build.tensorrt import MAX_BATCH, MIN_BATCH, OPT_BATCH, onnx_input_dims
from facefuse.imaging import decode_image
from facefuse.network import INPUT_NAMES, INPUT_SHAPES, unpack_geometry


@pytest.fixture(scope="module")
def preprocessor():
    return int8.cpu_preprocessor()


@pytest.fixture(scope="module")
def photos():
    return int8.load_photos()


@pytest.fixture(scope="module")
def small_set(preprocessor):
    """2 calibration variants (the original photos, one augmented) and 1 held-out variant: 24 requests."""
    return int8.build_calibration_set(preprocessor, seed=0, calibration_variants=2, held_out_variants=1,
                                      log=lambda _: None)


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory) -> Path:
    """The current network exported fresh (not model_repository's copy, which may be stale or absent)."""
    from build.export_onnx import export

    return export(tmp_path_factory.mktemp("int8_onnx") / "fusion.onnx")


def _row_hashes(array: np.ndarray) -> list[str]:
    return [hashlib.sha1(row.tobytes()).hexdigest() for row in array]


def test_set_has_the_onnx_inputs_names_dtypes_and_shapes(small_set, onnx_path, tmp_path):
    graph_dims = onnx_input_dims(onnx.load(str(onnx_path)))
    assert list(graph_dims) == list(INPUT_NAMES)
    for split in small_set.values():
        assert set(split.arrays) == set(INPUT_NAMES)
        rows = len(split.rows)
        assert rows >= 6  # at most a few requests lose a face to the augmentation
        for name, array in split.arrays.items():
            assert array.dtype == np.float32, name
            assert array.shape == (rows, *INPUT_SHAPES[name]) == (rows, *graph_dims[name]), name
            assert np.isfinite(array).all(), name
        assert split.arrays["CROPS"].min() >= 0.0 and split.arrays["CROPS"].max() <= 1.0
    calibration = small_set[int8.CALIBRATION]
    assert len(calibration.rows) + len(calibration.skipped) == 2 * int8.ROWS_PER_VARIANT
    # Degrees spread over 0..100, corners included.
    parts = unpack_geometry(torch.from_numpy(calibration.arrays["GEOMETRY"]))
    degrees = torch.cat([parts["FACE_DEGREE"], parts["PROFILE_DEGREE"]], dim=1).numpy()
    assert degrees.min() == 0.0 and degrees.max() == 100.0 and degrees.std(axis=0).min() > 20.0
    # Saved and loaded back unchanged, with one manifest row per array row.
    paths = int8.save_set(small_set, tmp_path, seed=0)
    for name, split in small_set.items():
        loaded = int8.load_split(paths[name])
        assert all(np.array_equal(loaded[key], split.arrays[key]) for key in INPUT_NAMES)
    manifest = json.loads(paths["manifest"].read_text())
    assert len(manifest["splits"]["calibration"]["rows"]) == len(calibration.rows)


def test_check_arrays_refuses_what_the_engine_would_not_take(small_set):
    arrays = small_set[int8.HELD_OUT].arrays
    with pytest.raises(ValueError, match="not the network inputs"):
        int8.check_arrays({name: arrays[name] for name in INPUT_NAMES[1:]})
    with pytest.raises(ValueError, match="expected float32"):
        int8.check_arrays({**arrays, "GEOMETRY": arrays["GEOMETRY"].astype(np.float64)})
    with pytest.raises(ValueError, match="row counts"):
        int8.check_arrays({**arrays, "GEOMETRY": arrays["GEOMETRY"][:-1]})


def test_set_is_deterministic_for_a_seed(preprocessor, photos, small_set):
    quiet = {"log": lambda _: None}
    first = small_set[int8.HELD_OUT]  # seed 0
    again = int8.build_split(preprocessor, int8.HELD_OUT, 1, 0, photos, **quiet)
    other = int8.build_split(preprocessor, int8.HELD_OUT, 1, 1, photos, **quiet)
    assert first.rows == again.rows
    for name in INPUT_NAMES:
        assert np.array_equal(first.arrays[name], again.arrays[name]), name
    assert first.rows[0]["target_augmentation"] != other.rows[0]["target_augmentation"]
    assert not set(_row_hashes(first.arrays["CROPS"][:, 1])) & set(_row_hashes(other.arrays["CROPS"][:, 1]))


@pytest.mark.parametrize("change", [
    {"flip": True}, {"rotate_deg": 5.0}, {"scale": 0.9}, {"contrast": 1.2}, {"brightness": 20.0},
    {"jpeg_quality": 50},
])
def test_each_augmentation_changes_the_photo(photos, change):
    photo = photos[int8.GROUP_PHOTO]
    original = decode_image(int8.Augmentation().encode(photo))
    assert np.array_equal(original, photo)  # the identity is lossless (PNG)
    changed = decode_image(int8.Augmentation(**change).encode(photo))
    assert changed.shape == photo.shape
    assert np.abs(changed.astype(int) - photo.astype(int)).mean() > 0.5, change


def test_variants_differ_and_held_out_rows_are_not_calibration_rows(small_set):
    calibration, held_out = small_set[int8.CALIBRATION], small_set[int8.HELD_OUT]
    assert calibration.rows[0]["source_augmentation"] == vars(int8.Augmentation())  # variant 0: the photos as shipped
    augmentations = {(row[role], str(row[f"{role}_augmentation"])) for split in (calibration, held_out)
                     for row in split.rows for role in ("source", "target")}
    by_variant: dict[tuple[str, int], set[str]] = {}
    for split in (calibration, held_out):
        for row, digest in zip(split.rows, _row_hashes(split.arrays["CROPS"][:, 1])):
            by_variant.setdefault((split.name, row["variant"]), set()).add(digest)
    groups = list(by_variant.values())
    assert len(groups) == 3
    for index, group in enumerate(groups):  # no aligned crop repeats from one variant to another
        assert all(not group & other for other in groups[index + 1:])
    # Each photo's augmentation is different in every variant, across the splits too.
    assert len(augmentations) == 2 * 3
    calibration_hashes = set(_row_hashes(calibration.arrays["CROPS"][:, 0]))
    calibration_hashes |= set(_row_hashes(calibration.arrays["CROPS"][:, 1]))
    for index, role in enumerate(("source", "target")):
        assert not set(_row_hashes(held_out.arrays["CROPS"][:, index])) & calibration_hashes, role


def test_loader_yields_feed_dicts_of_the_onnx_graph(small_set, onnx_path):
    from polygraphy.backend.base.util import check_inputs
    from polygraphy.backend.onnx.util import get_input_metadata

    model = onnx.load(str(onnx_path))
    graph_inputs = {value.name: value.type.tensor_type.elem_type for value in model.graph.input}
    graph_dims = onnx_input_dims(model)
    metadata = get_input_metadata(model.graph)
    arrays = small_set[int8.CALIBRATION].arrays
    rows = len(arrays["GEOMETRY"])
    loader = int8.CalibrationLoader(arrays)
    batches = list(loader)
    assert len(batches) == len(loader) == math.ceil(rows / OPT_BATCH)
    for batch in batches:
        assert list(batch) == [value.name for value in model.graph.input]
        for name, array in batch.items():
            assert array.shape == (OPT_BATCH, *graph_dims[name]), name
            assert array.dtype == onnx.helper.tensor_dtype_to_np_dtype(graph_inputs[name]), name
            assert array.flags.c_contiguous
        check_inputs(batch, metadata)  # polygraphy's own check, as its Calibrator runs it
    # Every row is fed at least once (the last batch wraps around), and a second pass gives the same batches.
    fed = np.concatenate([batch["CROPS"] for batch in batches])
    assert set(_row_hashes(fed)) == set(_row_hashes(arrays["CROPS"]))
    assert all(np.array_equal(a["CROPS"], b["CROPS"]) for a, b in zip(batches, loader))
    # A row count that is not a multiple of OPT_BATCH: the last batch is still full, topped up from the first rows.
    odd = {name: array[:OPT_BATCH + 3] for name, array in arrays.items()}
    last = list(int8.CalibrationLoader(odd))[-1]
    assert all(array.shape[0] == OPT_BATCH for array in last.values())
    assert np.array_equal(last["CROPS"], np.concatenate([odd["CROPS"][OPT_BATCH:], odd["CROPS"][:OPT_BATCH - 3]]))
    # And the graph runs on a batch.
    outputs = int8.onnxruntime_infer(onnx_path)(batches[0])
    assert outputs["FUSED_CROP"].shape == (OPT_BATCH, 3, 256, 256)
    assert outputs["BLEND_MASK"].shape == (OPT_BATCH, 1, 256, 256)


def test_comparison_and_report(small_set, onnx_path, tmp_path):
    held_out = {name: array[:5] for name, array in small_set[int8.HELD_OUT].arrays.items()}
    reference = int8.run_batched(int8.onnxruntime_infer(onnx_path), held_out, batch=OPT_BATCH)
    chunked = int8.run_batched(int8.onnxruntime_infer(onnx_path), held_out, batch=2)  # 3 batches, last one short
    assert all(np.allclose(chunked[name], reference[name], atol=1e-5) for name in reference)
    off = {name: array.copy() for name, array in reference.items()}
    off["FUSED_CROP"][1] += 2.0 / 255.0  # one row two grey levels off everywhere
    off["BLEND_MASK"][3, 0, 10, 10] += 0.25
    same, shifted = int8.comparisons({"ref": reference, "off": off}, [("ref", "ref"), ("off", "ref")])
    assert same.fused_max_abs_grey == 0.0 and same.fused_psnr_db == math.inf and same.mask_max_abs == 0.0
    assert shifted.rows == 5
    assert shifted.fused_max_abs_grey == pytest.approx(2.0, rel=1e-4)
    assert shifted.fused_mean_abs_grey == pytest.approx(2.0 / 5, rel=1e-4)
    assert shifted.fused_worst_row_psnr_db == pytest.approx(20 * math.log10(255 / 2), rel=1e-4)
    assert shifted.fused_psnr_db == pytest.approx(shifted.fused_worst_row_psnr_db + 10 * math.log10(5), rel=1e-4)
    assert shifted.mask_max_abs == pytest.approx(0.25, rel=1e-5)
    md_path, csv_path = int8.write_report(tmp_path, [same, shifted], ["context line"])
    with csv_path.open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["candidate"] for row in table] == ["ref", "off"]
    assert float(table[1]["fused_max_abs_grey"]) == pytest.approx(2.0, rel=1e-4) and table[0]["fused_psnr_db"] == "inf"
    assert "context line" in md_path.read_text() and "| off | ref | 5 | 2.00 |" in md_path.read_text()


def test_without_tensorrt_the_set_is_written_and_no_engine_built(preprocessor, small_set, onnx_path, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails, even where it is installed
    assert int8.tensorrt_import_error() is not None
    args = ["--onnx", str(onnx_path), "--out", str(tmp_path), "--calibration-variants", "1",
            "--held-out-variants", "1"]
    status = int8.main(args, preprocessor=preprocessor)
    captured = capsys.readouterr()
    assert status == int8.EXIT_NO_TENSORRT == 3
    lines = [line for line in captured.err.splitlines() if line.startswith("INT8 needs TensorRT")]
    assert len(lines) == 1, captured.err
    assert "Python package `tensorrt` not importable" in lines[0]
    assert f"calibration set written to {tmp_path / 'calibration.npz'}" in lines[0]
    assert lines[0].endswith("no engine built")
    assert "[int8] calibration variant 1/1" in captured.out  # progress lines
    written = {path.name for path in tmp_path.iterdir()}
    assert written == {"calibration.npz", "held_out.npz", "calibration_set.json"}  # no plan, cache or report
    assert int8.check_arrays(int8.load_split(tmp_path / "calibration.npz")) >= 6

    # --calibration-only: exit 0 after the set (built here by the module's fixture, to save the seconds).
    monkeypatch.setattr(int8, "build_calibration_set", lambda *_, **__: small_set)
    only = tmp_path / "only"
    assert int8.main([*args[:2], "--out", str(only), "--calibration-only"], preprocessor=preprocessor) == 0
    out = capsys.readouterr().out
    assert "--calibration-only" in out and "no engine built" in out and "INT8 needs TensorRT" not in out
    assert {path.name for path in only.iterdir()} == {"calibration.npz", "held_out.npz", "calibration_set.json"}


def test_a_stale_onnx_is_refused_before_any_work(tmp_path, capsys):
    value = onnx.helper.make_tensor_value_info("SOURCE_CROP", onnx.TensorProto.FLOAT, ["batch", 3, 128, 128])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["SOURCE_CROP"], ["FUSED_CROP"])], "stale",
                                   [value], [onnx.helper.make_tensor_value_info("FUSED_CROP", onnx.TensorProto.FLOAT,
                                                                                ["batch", 3, 128, 128])])
    stale = tmp_path / "stale.onnx"
    onnx.save(onnx.helper.make_model(graph), str(stale))
    assert int8.main(["--onnx", str(stale), "--out", str(tmp_path / "set")], preprocessor=object()) == 1
    assert "differ from facefuse.network.INPUT_SHAPES" in capsys.readouterr().err
    assert not (tmp_path / "set").exists()


def test_tensorrt_path_plumbing_with_onnxruntime_standing_in(small_set, onnx_path, tmp_path, monkeypatch):
    """No TensorRT here: polygraphy's TensorRT classes are replaced by fakes (ONNX Runtime runs the "engines"), to
    check what build_and_compare asks of them and what it writes. The real builds only run on a TensorRT host."""
    import types

    import polygraphy.backend.trt as polygraphy_trt

    fake_trt = types.ModuleType("tensorrt")
    fake_trt.__version__ = "0.0-fake"
    fake_trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    seen: dict[str, object] = {}
    onnxruntime_run = int8.onnxruntime_infer(onnx_path)

    def calibrator(loader, cache):
        return types.SimpleNamespace(loader=loader, cache=cache)

    def create_config(**kwargs):
        return kwargs

    def engine_from_network(network, config):
        return lambda: ("INT8" if config.get("int8") else "FP16", config)

    def save_engine(build, path):
        def run():
            label, config = build()
            seen[label] = config
            if config.get("int8"):
                batches = list(config["calibrator"].loader)
                seen["calibration_batches"] = len(batches)
                Path(config["calibrator"].cache).write_text("TRT-fake-EntropyCalibration2\n")
            Path(path).write_bytes(b"fake engine")
            return label
        return run

    class Runner:
        def __init__(self, engine):
            self.engine = engine

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def infer(self, feeds):
            outputs = dict(onnxruntime_run(feeds))
            if self.engine == "INT8":  # a visible error: the crop rounded to 16 grey levels
                outputs["FUSED_CROP"] = np.round(outputs["FUSED_CROP"] * 15.0) / 15.0
            return outputs

    for name, value in {"Calibrator": calibrator, "CreateConfig": create_config,
                        "EngineFromNetwork": engine_from_network, "SaveEngine": save_engine,
                        "NetworkFromOnnxPath": lambda path: path, "TrtRunner": Runner}.items():
        monkeypatch.setattr(polygraphy_trt, name, value)

    splits = {name: {key: array[:10] for key, array in split.arrays.items()} for name, split in small_set.items()}
    md_path, csv_path = int8.build_and_compare(onnx_path, splits, tmp_path, log=lambda _: None)
    assert seen["calibration_batches"] == 2  # 10 rows -> 2 batches of OPT_BATCH
    assert seen["INT8"]["fp16"] and seen["INT8"]["int8"] and not seen["FP16"].get("int8")
    profile = seen["INT8"]["profiles"][0]
    assert set(profile) == set(INPUT_NAMES)
    for name, shape in INPUT_SHAPES.items():  # the serving profile of build/tensorrt.py
        assert tuple(profile[name].min) == (MIN_BATCH, *shape) and tuple(profile[name].max) == (MAX_BATCH, *shape)
        assert tuple(profile[name].opt) == (OPT_BATCH, *shape)
    assert {path.name for path in tmp_path.iterdir()} == {int8.INT8_PLAN, int8.FP16_PLAN, int8.CACHE_NAME,
                                                          "report.md", "report.csv"}
    with csv_path.open() as handle:
        table = {(row["candidate"], row["reference"]): row for row in csv.DictReader(handle)}
    assert set(table) == {("INT8", int8.REFERENCE), ("FP16", int8.REFERENCE), ("INT8", "FP16")}
    assert float(table[("FP16", int8.REFERENCE)]["fused_max_abs_grey"]) == 0.0
    assert 1.0 < float(table[("INT8", int8.REFERENCE)]["fused_max_abs_grey"]) <= 255 / 30 + 1e-3
    assert "python -m build.tensorrt --int8 --calibration-cache" in md_path.read_text()
