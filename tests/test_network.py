"""Fusion network v1: mask, colour match, multi-band blend, degree behaviour."""

import numpy as np
import pytest
import torch

from build.export_onnx import example_inputs
from facefuse.alignment import CROP_SIZE, TEMPLATE
from facefuse.network import FaceEllipseMask, FusionNetwork, LaplacianBlend, masked_colour_match


@pytest.fixture(scope="module")
def network():
    return FusionNetwork().eval()


def _landmarks(batch=1):
    return torch.from_numpy(TEMPLATE)[None].repeat(batch, 1, 1)


def _degrees(value, batch=1):
    return torch.full((batch, 1), float(value))


def test_face_mask_covers_the_face_and_fades_out():
    mask = FaceEllipseMask()(_landmarks())[0, 0].numpy()
    nose_x, nose_y = TEMPLATE[2].round().astype(int)
    assert mask[nose_y, nose_x] == pytest.approx(1.0)
    for eye in TEMPLATE[:2].round().astype(int):
        assert mask[eye[1], eye[0]] > 0.99
    assert mask[0, 0] == 0 and mask[-1, -1] == 0 and mask[5, CROP_SIZE // 2] == 0
    # Feathered: a ray from the nose outwards passes through intermediate values, never increasing.
    ray = mask[nose_y, nose_x:]
    assert np.all(np.diff(ray) <= 1e-6) and ((ray > 0.05) & (ray < 0.95)).sum() >= 5


def test_face_mask_follows_the_landmarks():
    shifted = _landmarks() + torch.tensor([30.0, 0.0])
    base, moved = FaceEllipseMask()(_landmarks())[0, 0], FaceEllipseMask()(shifted)[0, 0]
    assert torch.allclose(moved[:, 60:200], base[:, 30:170], atol=1e-4)


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
    chroma = _ycbcr(matched)[:, 1:]
    assert chroma.abs().max() < 0.02  # no tint left
    # The luma gain is bounded below at 0.5: the source's texture survives a flat target.
    assert float(_ycbcr(matched)[:, 0].std()) == pytest.approx(0.5 * float(_ycbcr(source)[:, 0].std()), rel=0.05)


def test_degree_zero_returns_the_target_exactly(network):
    source, target, source_lm, target_lm, _, _ = example_inputs(batch=2)
    with torch.inference_mode():
        fused, mask = network(source, target, source_lm, target_lm, _degrees(0, 2), _degrees(100, 2))
    assert torch.equal(fused, torch.clamp(target, 0, 1))
    assert mask.abs().max() == 0


def test_change_grows_with_face_degree(network):
    source, target, source_lm, target_lm, _, _ = example_inputs(batch=1)
    changes = []
    with torch.inference_mode():
        for degree in (0, 25, 50, 75, 100):
            fused, mask = network(source, target, source_lm, target_lm, _degrees(degree), _degrees(50))
            changes.append((fused - target).abs().mean().item())
    assert all(a < b for a, b in zip(changes, changes[1:]))


def test_change_stays_inside_the_paste_mask(network):
    source, target, source_lm, target_lm, _, _ = example_inputs(batch=2)
    with torch.inference_mode():
        fused, mask = network(source, target, source_lm, target_lm, _degrees(100, 2), _degrees(100, 2))
    outside = mask < 1e-3
    assert outside.float().mean() > 0.2  # the corners and background are untouched
    assert ((fused - target).abs() * outside).max() < 0.02


def test_outputs_have_the_wire_shapes(network):
    with torch.inference_mode():
        fused, mask = network(*example_inputs(batch=3))
    assert fused.shape == (3, 3, CROP_SIZE, CROP_SIZE) and mask.shape == (3, 1, CROP_SIZE, CROP_SIZE)
    assert fused.min() >= 0 and fused.max() <= 1 and mask.min() >= 0 and mask.max() <= 1
