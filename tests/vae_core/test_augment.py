"""Training augmentation: flips swap the eye, results stay on the 8-bit grid, rotations rotate."""

import pytest
import torch

from vae_core.augment import AugmentConfig, augment, rotate


def _grid_images(n: int = 16, c: int = 3, size: int = 12) -> torch.Tensor:
    """(n,c,size,size) on the 8-bit grid, with a left-right asymmetry (bright left half)."""
    x = torch.randint(0, 256, (n, c, size, size)).float() / 255
    x[..., : size // 2] = 1.0
    return x


def test_inactive_config_returns_the_batch_unchanged():
    x, eye = _grid_images(), torch.ones(16)
    out, out_eye = augment(x, AugmentConfig(), eye)
    assert out is x and out_eye is eye


def test_hflip_flips_pixels_and_swaps_the_eye_side():
    x = _grid_images(64)
    eye = torch.tensor([1.0, -1.0, 0.0, 1.0] * 16)  # right, left, unknown, right
    gen = torch.Generator().manual_seed(0)
    out, out_eye = augment(x, AugmentConfig(hflip=True), eye, gen)
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])
    assert torch.all(flipped ^ kept)  # each image is either flipped or untouched
    assert 10 < flipped.sum() < 54  # about half are flipped
    torch.testing.assert_close(out_eye[flipped], -eye[flipped])  # R <-> L, unknown stays 0
    torch.testing.assert_close(out_eye[kept], eye[kept])


@pytest.mark.parametrize("cfg", [AugmentConfig(rotation=15), AugmentConfig(jitter=0.3)])
def test_results_stay_in_range_and_on_the_8_bit_grid(cfg):
    out, _ = augment(_grid_images(), cfg, generator=torch.Generator().manual_seed(1))
    assert out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out * 255, torch.round(out * 255))
    assert not torch.equal(out, _grid_images())


def test_a_quarter_turn_moves_the_bright_left_half_to_top_or_bottom():
    x = torch.zeros(1, 1, 20, 20)
    x[..., :10] = 1.0  # bright left half
    out = rotate(x, torch.tensor([90.0]))[0, 0]
    top, bottom = out[:10].mean(), out[10:].mean()
    left, right = out[:, :10].mean(), out[:, 10:].mean()
    assert abs(top - bottom) > 0.8  # one of them is now bright, the other dark
    assert abs(left - right) < 0.2


def test_small_rotations_change_images_only_a_little():
    x = torch.zeros(50, 1, 32, 32)
    x[..., 8:24, 8:24] = 1.0  # a bright centred square
    out, _ = augment(x, AugmentConfig(rotation=5), generator=torch.Generator().manual_seed(0))
    changed = (out - x).abs().mean((1, 2, 3))
    assert changed.max() < 0.08 and changed.mean() > 0.002


def test_jitter_changes_brightness_per_image_within_the_range():
    x = torch.full((200, 1, 8, 8), 0.5)
    out, _ = augment(x, AugmentConfig(jitter=0.2), generator=torch.Generator().manual_seed(2))
    means = out.mean((1, 2, 3))
    assert means.min() >= 0.5 * 0.8 - 1 / 255 and means.max() <= 0.5 * 1.2 + 1 / 255
    assert means.std() > 0.02  # drawn per image
