"""The image track: flows on the pixel plane, the pull-back, the feature-based score, orthonormal heads."""
import math

import torch

from models.symmetry_generators import images as I
from models.symmetry_generators.generators import orthonormaliser


def test_rk4_flow_of_the_rotation_field_is_a_rotation():
    grid = I.pixel_grid(9)
    moved = I.flowed_grid(I.affine_fields()["rotation"], 9, 0.3, 8)
    c, s = math.cos(0.3), math.sin(0.3)
    exact = torch.stack([c * grid[..., 0] - s * grid[..., 1], s * grid[..., 0] + c * grid[..., 1]], -1)
    assert torch.allclose(moved, exact, atol=1e-5)


def test_the_identity_flow_keeps_the_image_and_a_translation_shifts_it():
    x = torch.rand(2, 1, 12, 12)
    zero = lambda p: torch.zeros_like(p)
    assert torch.allclose(I.warp(x, I.flowed_grid(zero, 12, 0.5, 2)), x, atol=1e-6)
    step = 2 / 11                                                  # one pixel in [-1, 1] coordinates
    moved = I.warp(x, I.flowed_grid(I.affine_fields()["translate_x"], 12, step, 2))
    assert torch.allclose(moved[..., :-1], x[..., 1:], atol=1e-5)  # the pull-back reads one pixel right


def test_feature_validity_is_zero_for_the_same_images_and_positive_otherwise():
    torch.manual_seed(0)
    cnn = I.FeatureCNN(12, 4, 8, 10)
    x = torch.rand(6, 1, 12, 12)
    with torch.no_grad():
        assert float(I.feature_validity(cnn, x, x)) < 2e-3      # arccos of a clamped cosine 1 - 1e-6
        assert float(I.feature_validity(cnn, x, torch.rand(6, 1, 12, 12))) > 0.05


def test_plane_heads_are_orthonormal_and_rotation_is_orthogonal_to_scaling_and_translation():
    torch.manual_seed(0)
    net = I.PlaneGeneratorNet(3, 16, 8)
    grid = I.pixel_grid(10)
    mix = orthonormaliser(net.raw(grid))
    values = torch.einsum("ij,...jc->...ic", mix, net.raw(grid)).reshape(-1, 3, 2)
    gram = torch.einsum("nac,nbc->ab", values, values) / values.shape[0]
    assert torch.allclose(gram, torch.eye(3), atol=1e-3)
    f = I.affine_fields()
    assert abs(I.field_correlation(f["rotation"], f["scaling"], 10)) < 1e-6
    assert abs(I.field_correlation(f["rotation"], f["translate_x"], 10)) < 1e-6
    assert I.field_correlation(f["rotation"], lambda p: 2 * f["rotation"](p), 10) > 0.999


def test_a_short_generator_fit_and_the_augmenters_run():
    torch.manual_seed(0)
    images = torch.rand(16, 1, 12, 12)
    cnn = I.FeatureCNN(12, 4, 8, 10)
    net = I.PlaneGeneratorNet(2, 8, 4)
    losses = []
    I.fit_plane_generators(net, cnn, images, I.PlaneTrainConfig(3, 1e-3, 4, 0.4, 2, 1.0, 3.0),
                           torch.Generator().manual_seed(0), on_step=lambda i, loss: losses.append(loss))
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    for make, k in ((net.combined, 2), (I.affine_maker(["translate_x", "shear_y"], 12), 2)):
        out = I.flow_augmenter(make, k, 0.1, 2)(images[:5], torch.Generator().manual_seed(1))
        assert out.shape == (5, 1, 12, 12) and not torch.allclose(out, images[:5])
