"""Fusion network v2: spline warps, polygon masks, colour match, multi-band blend, degree behaviour."""

import numpy as np
import pytest
import torch

from build.export_onnx import example_inputs
from facefuse import geometry as geometry_module
from facefuse.alignment import CROP_SIZE
from facefuse.geometry import (
    FACE_OVAL,
    evaluate_tps,
    fit_tps,
    fit_tps_batch,
    fusion_geometry,
    fusion_geometry_batch,
    synthetic_mesh,
)
from facefuse.network import (
    GEOMETRY_PARTS,
    GEOMETRY_SIZE,
    FusionNetwork,
    LaplacianBlend,
    example_parts,
    masked_colour_match,
    pack_geometry,
    pack_inputs,
    polygon_distance,
    unpack_geometry,
)
from facefuse.network import INPUT_NAMES as INPUT_NAMES_FOR_TEST


@pytest.fixture(scope="module")
def network():
    return FusionNetwork().eval()


def _degrees(value, batch=1):
    return torch.full((batch, 1), float(value))


def _geometry_tensors(source_mesh, target_mesh, profile):
    geometry = fusion_geometry(source_mesh, target_mesh, profile)
    return [torch.from_numpy(geometry[name])[None] for name in
            ("CONTROL_POINTS", "WARP_COEFFICIENTS", "FUSED_OUTLINE", "TARGET_OUTLINE")], geometry


def test_polygon_distance_is_signed_and_metric():
    square = torch.tensor([[[10.0, 10.0], [50.0, 10.0], [50.0, 50.0], [10.0, 50.0]]])
    pixels = torch.arange(64, dtype=torch.float32)
    grid_y, grid_x = torch.meshgrid(pixels, pixels, indexing="ij")
    distance = polygon_distance(square, grid_x[None, None], grid_y[None, None])[0, 0]
    assert distance[30, 30] == pytest.approx(20.0)  # centre: 20 px from every edge
    assert distance[30, 12] == pytest.approx(2.0) and distance[30, 5] == pytest.approx(-5.0)
    # The winding of the outline does not matter.
    reversed_distance = polygon_distance(square.flip(1), grid_x[None, None], grid_y[None, None])[0, 0]
    assert torch.allclose(distance, reversed_distance)


def test_tps_interpolates_its_control_points():
    rng = np.random.default_rng(0)
    centres = rng.uniform(20, 236, size=(40, 2))
    values = np.hstack([centres * 1.05 + 3.0 + rng.normal(0, 2, centres.shape), centres])
    coefficients = fit_tps(centres, values, regularisation=0.0)
    np.testing.assert_allclose(evaluate_tps(centres, coefficients, centres), values, atol=1e-6)


def test_batched_geometry_equals_one_row_at_a_time():
    sources = np.stack([synthetic_mesh(2 * row) for row in range(5)])
    targets = np.stack([synthetic_mesh(2 * row + 1) for row in range(5)])
    degrees = [0.0, 25.0, 50.0, 100.0, 130.0]  # 130 clips to 100
    batch = fusion_geometry_batch(sources, targets, degrees)
    for row in range(5):
        single = fusion_geometry(sources[row], targets[row], degrees[row])
        for name, value in single.items():
            np.testing.assert_allclose(batch[name][row], value, rtol=0, atol=1e-4, err_msg=name)
    assert not np.allclose(batch["FUSED_MESH"][0], batch["FUSED_MESH"][3])  # the degree matters per row


@pytest.mark.parametrize("method", ["lu", "cholesky"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU host)"))])
def test_tps_solve_in_torch_equals_numpy(device, method):
    # The GPU path builds and solves the systems with torch (on the CPU device too); "cholesky" solves the kernel
    # part on the polynomials' null space instead of the whole indefinite system.
    rng = np.random.default_rng(5)
    centres = rng.uniform(10, 246, size=(3, 60, 2))
    centres[2, 30:] = centres[2, :30] + 1e-3  # near-duplicate points: the regularisation keeps the system solvable
    values = rng.uniform(0, 256, size=(3, 60, 4))
    expected = fit_tps_batch(centres, values)
    got = geometry_module._fit_tps_torch(centres / CROP_SIZE, values, geometry_module.TPS_REGULARISATION, device,
                                         method)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    collinear = np.stack([np.linspace(10, 246, 60), np.full(60, 128.0)], axis=1)[None]
    with pytest.raises(np.linalg.LinAlgError, match="could not be solved"):  # no affine part fits a line's points
        geometry_module._fit_tps_torch(collinear / CROP_SIZE, values[:1], geometry_module.TPS_REGULARISATION,
                                       device, method)


def test_synthetic_warp_lands_where_expected(network):
    """Draw isolated dots at source mesh points; at profile 100 and face 100 each must appear at its
    intermediate (= similarity-aligned source) position in the fused crop, and nowhere near the old one."""
    source_mesh, target_mesh = synthetic_mesh(3), synthetic_mesh(4)
    (control, coefficients, fused_outline, target_outline), geometry = _geometry_tensors(source_mesh, target_mesh, 100)
    fused_mesh = geometry["FUSED_MESH"]
    face = polygon_distance(fused_outline, network.grid_x, network.grid_y)[0, 0].numpy()
    probes: list[int] = []
    for index in range(468):
        x, y = np.round(fused_mesh[index]).astype(int)
        isolated = all(np.linalg.norm(source_mesh[index] - source_mesh[other]) > 12 for other in probes)
        moved = np.linalg.norm(source_mesh[index] - fused_mesh[index]) > 3  # a dot that barely moves proves nothing
        if index not in FACE_OVAL and face[y, x] > 25 and isolated and moved:
            probes.append(index)
    assert len(probes) >= 5
    source = np.full((CROP_SIZE, CROP_SIZE, 3), 0.5, np.float32)
    for index in probes:
        x, y = np.round(source_mesh[index]).astype(int)
        source[y - 1:y + 2, x - 1:x + 2] = 1.0
    source_crop = torch.from_numpy(source.transpose(2, 0, 1))[None]
    with torch.inference_mode():
        fused, _ = network.fuse(source_crop, torch.full_like(source_crop, 0.5), control, coefficients, fused_outline,
                           target_outline, _degrees(100), _degrees(100))
    brightness = fused[0, 0].numpy()
    background = np.median(brightness)
    for index in probes:
        x, y = np.round(fused_mesh[index]).astype(int)
        window = np.clip(brightness[y - 6:y + 7, x - 6:x + 7] - background, 0, None)
        assert window.max() > 0.1, index
        weights_y, weights_x = np.mgrid[-6:7, -6:7]
        found = np.array([x + (window * weights_x).sum() / window.sum(), y + (window * weights_y).sum() / window.sum()])
        # The dot was drawn at the rounded source position: carry that rounding along.
        expected = fused_mesh[index] + (np.round(source_mesh[index]) - source_mesh[index])
        assert np.linalg.norm(found - expected) <= 1.0, (index, found, expected)


def test_degree_zero_zero_returns_the_target_crop(network):
    inputs = list(example_parts(batch=2))
    (control, coefficients, fused_outline, target_outline), _ = _geometry_tensors(synthetic_mesh(5),
                                                                                   synthetic_mesh(6), 0)
    target = inputs[1][:1]
    with torch.inference_mode():
        fused, mask = network.fuse(inputs[0][:1], target, control, coefficients, fused_outline, target_outline,
                              _degrees(0), _degrees(0))
    # Bilinear sampling at the pixel centres the identity spline returns: equal to float rounding.
    assert (fused - target).abs().max() < 1e-3
    assert mask.abs().max() == 0


def test_profile_only_moves_the_target_towards_the_source_shape(network):
    source_mesh, target_mesh = synthetic_mesh(7), synthetic_mesh(8)
    inputs = list(example_parts(batch=1))
    for profile, expect_change in ((0, False), (100, True)):
        (control, coefficients, fused_outline, target_outline), _ = _geometry_tensors(source_mesh, target_mesh, profile)
        with torch.inference_mode():
            fused, mask = network.fuse(inputs[0], inputs[1], control, coefficients, fused_outline, target_outline,
                                  _degrees(0), _degrees(profile))
        changed = (fused - inputs[1]).abs().mean().item()
        assert (changed > 0.01) == expect_change, (profile, changed)


def test_laplacian_blend_extremes():
    blend = LaplacianBlend()
    base, detail = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64) - 0.5
    assert torch.allclose(blend(base, detail, torch.ones(2, 1, 64, 64)), base + detail, atol=1e-5)
    assert torch.allclose(blend(base, detail, torch.zeros(2, 1, 64, 64)), base, atol=1e-6)


def test_laplacian_blend_leaves_no_seam():
    """A step in brightness blended with a hard mask: the result's largest jump is far smaller than the step."""
    blend = LaplacianBlend()
    base = torch.zeros(1, 3, 128, 128)
    detail = torch.full((1, 3, 128, 128), 0.5)
    hard_mask = torch.zeros(1, 1, 128, 128)
    hard_mask[..., :, :64] = 1.0
    out = blend(base, detail, hard_mask)[0, 0, 64]
    assert out[10] == pytest.approx(0.5, abs=0.02) and out[-10] == pytest.approx(0.0, abs=0.02)
    assert torch.diff(out).abs().max() < 0.1  # hard paste would jump by 0.5 in one pixel


def _ycbcr(image):
    return torch.einsum("ij,bjhw->bihw", torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5],
                                                       [0.5, -0.418688, -0.081312]]), image)


def test_colour_match_moves_statistics_to_the_target():
    generator = torch.Generator().manual_seed(0)
    target = 0.2 + 0.1 * torch.rand(1, 3, 64, 64, generator=generator)
    source = 0.5 + 0.15 * torch.rand(1, 3, 64, 64, generator=generator)  # luma gain ~0.67, within bounds
    weights = torch.ones(1, 1, 64, 64)
    matched = masked_colour_match(source, target, weights)
    assert torch.allclose(_ycbcr(matched).mean(dim=(2, 3)), _ycbcr(target).mean(dim=(2, 3)), atol=2e-3)
    assert torch.allclose(_ycbcr(matched).std(dim=(2, 3))[:, 0], _ycbcr(target).std(dim=(2, 3))[:, 0], rtol=0.05)


def test_colour_match_to_a_grayscale_target_drops_the_colour_but_keeps_texture():
    generator = torch.Generator().manual_seed(1)
    source = torch.rand(1, 3, 64, 64, generator=generator) * torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1) + 0.3
    gray = 0.3 + 0.01 * torch.rand(1, 1, 64, 64, generator=generator).repeat(1, 3, 1, 1)
    matched = masked_colour_match(source, gray, torch.ones(1, 1, 64, 64))
    assert _ycbcr(matched)[:, 1:].abs().max() < 0.02  # no tint left
    # The luma gain is bounded below at 0.5: the source's texture survives a flat target.
    assert float(_ycbcr(matched)[:, 0].std()) == pytest.approx(0.5 * float(_ycbcr(source)[:, 0].std()), rel=0.05)


def test_change_grows_with_face_degree(network):
    inputs = list(example_parts(batch=1))
    outputs = []
    with torch.inference_mode():
        for degree in (0, 25, 50, 75, 100):
            inputs[6] = _degrees(degree)
            outputs.append(network(*pack_inputs(*inputs))[0])  # the served signature: packed
    changes = [(fused - outputs[0]).abs().mean().item() for fused in outputs]
    assert all(a < b for a, b in zip(changes, changes[1:]))


def test_change_stays_inside_the_paste_mask(network):
    inputs = list(example_parts(batch=2, smooth=True))  # on pixel noise any sub-pixel warp would look like a change
    inputs[6], inputs[7] = _degrees(100, 2), _degrees(100, 2)
    with torch.inference_mode():
        fused, mask = network.fuse(*inputs)
        grids = (network._sampling_grids(inputs[2], inputs[3], torch.float32) + 1.0) * (CROP_SIZE / 2.0) - 0.5
    outside = mask < 1e-3
    assert outside.float().mean() > 0.2  # the corners and background are untouched
    # Outside the paste mask the warp has died down to a pixel or two (the target is pasted back there anyway).
    displacement = torch.hypot(grids[:, 0] - network.grid_x[:, 0], grids[:, 1] - network.grid_y[:, 0])
    assert (displacement * outside[:, 0]).max() < 2.0
    assert ((fused - inputs[1]).abs() * outside).max() < 0.1


def test_packed_geometry_round_trips_and_forward_equals_fuse(network):
    parts = example_parts(batch=3, seed=2)
    geometry = dict(zip(GEOMETRY_PARTS, parts[2:]))
    packed = pack_geometry(geometry)
    assert packed.shape == (3, GEOMETRY_SIZE) and packed.dtype == torch.float32
    for name, value in unpack_geometry(packed).items():
        assert torch.equal(value, geometry[name].float()), name
    # numpy parts pack to the same numbers, in numpy
    assert np.array_equal(pack_geometry({name: value.numpy() for name, value in geometry.items()}), packed.numpy())
    crops, packed_geometry = pack_inputs(*parts)
    assert crops.shape == (3, 2, 3, CROP_SIZE, CROP_SIZE)
    with torch.inference_mode():
        for served, direct in zip(network(crops, packed_geometry), network.fuse(*parts)):
            assert torch.equal(served, direct)


def test_outputs_have_the_wire_shapes(network):
    with torch.inference_mode():
        fused, mask = network(*example_inputs(batch=3))
    assert fused.shape == (3, 3, CROP_SIZE, CROP_SIZE) and mask.shape == (3, 1, CROP_SIZE, CROP_SIZE)
    assert fused.min() >= 0 and fused.max() <= 1 and mask.min() >= 0 and mask.max() <= 1


def test_geometry_stays_fp32_when_the_pixels_go_fp16():
    """An FP16 network keeps its coordinate grids in FP32 and takes the geometry in FP32 (input_dtype): the spline
    warp it computes is the FP32 network's to 0.15 px (FP16's spacing near |1| is 0.125 px; with the geometry in FP16
    the sampling positions were off by pixels)."""
    from facefuse.network import INPUT_NAMES, PIXEL_INPUTS, input_dtype

    half_network = FusionNetwork().eval().half()
    assert all(getattr(half_network, name).dtype == torch.float32 for name in FusionNetwork.GEOMETRY_BUFFERS)
    assert half_network.border_fade.dtype == torch.float16  # pixel-side buffers do follow the module
    assert [input_dtype(name, torch.float16) for name in INPUT_NAMES] == [
        torch.float16 if name in PIXEL_INPUTS else torch.float32 for name in INPUT_NAMES]
    inputs = example_parts(batch=4, seed=7)
    with torch.inference_mode():
        exact = FusionNetwork().eval()._sampling_grids(inputs[2], inputs[3], torch.float32)
        half = half_network._sampling_grids(inputs[2], inputs[3], torch.float16)
    assert half.dtype == torch.float16
    error_px = (half.float() - exact).abs().max().item() * CROP_SIZE / 2.0
    assert error_px < 0.15, error_px


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FP16 grid sampling runs on CUDA (PyTorch's CPU FP16 "
                    "grid_sample crashes); the FP16 network is the CUDA path")
def test_fp16_network_on_cuda_matches_fp32():
    from facefuse.fusion_runtime import TorchRuntime

    inputs = {name: tensor.numpy()
              for name, tensor in zip(INPUT_NAMES_FOR_TEST, example_inputs(batch=8, seed=3, smooth=True))}
    exact = TorchRuntime("cuda", half=False, cuda_graphs=False).run(inputs)
    half = TorchRuntime("cuda", half=True, cuda_graphs=True).run(inputs)
    fused_error = np.abs(half["FUSED_CROP"] - exact["FUSED_CROP"])
    assert fused_error.mean() < 2e-3 and fused_error.max() < 0.05, (fused_error.mean(), fused_error.max())
    assert np.abs(half["BLEND_MASK"] - exact["BLEND_MASK"]).max() < 0.02
