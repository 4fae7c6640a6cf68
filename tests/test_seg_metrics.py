"""Known-value checks for DiceIoU and BoundaryDistance (values computed by hand or brute force)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from jtml.metrics.segmentation import BoundaryDistance, DiceIoU


def square(y: int, x: int, size: int, shape: tuple[int, int] = (32, 32)) -> torch.Tensor:
    m = torch.zeros(shape)
    m[y : y + size, x : x + size] = 1
    return m


def stack(*parts: torch.Tensor) -> torch.Tensor:
    """(P,H,W) masks of one image → (1,P,H,W)."""
    return torch.stack(parts)[None]


# -- DiceIoU -------------------------------------------------------------------------------------------


def test_shifted_square_exact_fractions():
    # 4×4 square vs the same square shifted 1 px right: overlap 4×3 = 12, areas 16 + 16, union 20.
    m = DiceIoU(["fem"])
    m.update(stack(square(4, 4, 4)), stack(square(4, 5, 4)))
    out = m.compute()
    assert out["dice_fem"].item() == pytest.approx(24 / 32)
    assert out["iou_fem"].item() == pytest.approx(12 / 20)
    assert out["dice_mean"].item() == pytest.approx(24 / 32)
    assert out["iou_mean"].item() == pytest.approx(12 / 20)
    assert set(out) == {"dice_fem", "iou_fem", "dice_mean", "iou_mean"}


def test_empty_cases_are_defined():
    empty, full = torch.zeros(32, 32), square(2, 2, 5)
    m = DiceIoU(["a", "b", "c"])
    # a: both empty → 1; b: predicted nothing, target present → 0; c: predicted something, target empty → 0
    m.update(stack(empty, empty, full), stack(empty, full, empty))
    out = m.compute()
    assert out["dice_a"].item() == 1.0 and out["iou_a"].item() == 1.0
    assert out["dice_b"].item() == 0.0 and out["iou_b"].item() == 0.0
    assert out["dice_c"].item() == 0.0 and out["iou_c"].item() == 0.0
    assert out["dice_mean"].item() == pytest.approx(1 / 3)
    assert all(torch.isfinite(v) for v in out.values())


def test_threshold_applied_before_anything_single_channel():
    # torchmetrics would argmax a single channel → all foreground → dice 0. We threshold: empty vs empty = 1.
    m = DiceIoU(["fem"], threshold=0.5)
    m.update(torch.full((2, 1, 16, 16), 0.2), torch.zeros(2, 1, 16, 16))
    assert m.compute()["dice_fem"].item() == 1.0
    # The threshold value matters: at 0.1 the same prediction is all foreground → dice 0.
    m = DiceIoU(["fem"], threshold=0.1)
    m.update(torch.full((2, 1, 16, 16), 0.2), torch.zeros(2, 1, 16, 16))
    assert m.compute()["dice_fem"].item() == 0.0


def test_from_logits():
    logits = torch.full((1, 1, 8, 8), -3.0)
    logits[..., :4, :] = 3.0  # sigmoid 0.95 → top half predicted
    target = torch.zeros(1, 1, 8, 8)
    target[..., :4, :] = 1
    m = DiceIoU(["fem"], from_logits=True)
    m.update(logits, target)
    assert m.compute()["dice_fem"].item() == 1.0


def test_parts_are_separate():
    fem_t, tib_t = square(2, 2, 4), square(10, 10, 4)
    # fem predicted perfectly; tib prediction is 2 rows of 4 inside the 4×4 target: dice 16/24, iou 8/16.
    tib_p = torch.zeros(32, 32)
    tib_p[10:12, 10:14] = 1
    m = DiceIoU(["fem", "tib"])
    m.update(stack(fem_t, tib_p), stack(fem_t, tib_t))
    out = m.compute()
    assert out["dice_fem"].item() == 1.0
    assert out["dice_tib"].item() == pytest.approx(16 / 24)
    assert out["iou_tib"].item() == pytest.approx(0.5)
    assert out["dice_mean"].item() == pytest.approx((1 + 16 / 24) / 2)


def test_per_image_mean_and_accumulation_equals_one_call():
    g = torch.Generator().manual_seed(0)
    preds = torch.rand(6, 2, 16, 16, generator=g)
    target = (torch.rand(6, 2, 16, 16, generator=g) > 0.6).float()
    target[2] = 0  # include empty targets
    one = DiceIoU(["fem", "tib"])
    one.update(preds, target)
    many = DiceIoU(["fem", "tib"])
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):
        many.update(preds[sl], target[sl])
    a, b = one.compute(), many.compute()
    for k in a:
        assert a[k].item() == pytest.approx(b[k].item(), abs=1e-7)
    # Mean over images, computed independently.
    p, t = preds > 0.5, target > 0.5
    dices = []
    for i in range(6):
        inter, s = (p[i, 0] & t[i, 0]).sum().item(), p[i, 0].sum().item() + t[i, 0].sum().item()
        dices.append(1.0 if s == 0 else 2 * inter / s)
    assert a["dice_fem"].item() == pytest.approx(np.mean(dices), abs=1e-6)


def test_reset_and_bad_shapes():
    m = DiceIoU(["fem"])
    m.update(stack(square(0, 0, 4)), stack(torch.zeros(32, 32)))
    assert m.compute()["dice_fem"].item() == 0.0
    m.reset()
    m.update(stack(square(0, 0, 4)), stack(square(0, 0, 4)))
    assert m.compute()["dice_fem"].item() == 1.0
    with pytest.raises(ValueError):
        m.update(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8))  # 2 channels, 1 part
    with pytest.raises(ValueError):
        DiceIoU(["fem", "fem"])


# -- BoundaryDistance ------------------------------------------------------------------------------------


def brute_force(a: np.ndarray, b: np.ndarray, q: float) -> tuple[float, float]:
    """Independent reference: scipy erosion boundaries + all pairwise distances."""

    def boundary(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m, border_value=0))

    d = cdist(boundary(a), boundary(b))
    ab, ba = d.min(axis=1), d.min(axis=0)
    return max(ab.max(), ba.max()), max(np.percentile(ab, q), np.percentile(ba, q))


def test_shifted_square_hausdorff_3px():
    m = BoundaryDistance(["fem"])
    m.update(stack(square(10, 10, 10)), stack(square(10, 13, 10)), torch.tensor([0.25]))
    out = m.compute()
    assert out["hd_fem_px"].item() == pytest.approx(3.0)
    # >5% of boundary pixels are exactly 3 px off in both directions, so HD95 is 3 px too.
    assert out["hd95_fem_px"].item() == pytest.approx(3.0)
    assert out["hd_fem_mm"].item() == pytest.approx(0.75)
    assert out["hd95_fem_mm"].item() == pytest.approx(0.75)
    assert out["hd_mean_px"].item() == pytest.approx(3.0)
    assert out["n_empty_mismatch_fem"].item() == 0


def test_diagonal_shift_and_outlier_against_brute_force():
    # Target: a square plus one stray pixel far away → HD is large, HD95 is not.
    a = square(8, 8, 12, (48, 48)).bool()
    b = square(10, 9, 12, (48, 48)).bool()
    b[40, 40] = True
    hd, hd95 = brute_force(a.numpy(), b.numpy(), 95)
    assert hd == pytest.approx(math.hypot(21, 21))  # stray (40,40) to a's nearest boundary pixel (19,19)
    assert hd95 < hd / 2
    m = BoundaryDistance(["fem"])
    m.update(stack(a.float()), stack(b.float()), 0.5)
    out = m.compute()
    assert out["hd_fem_px"].item() == pytest.approx(hd, rel=1e-5)
    assert out["hd95_fem_px"].item() == pytest.approx(hd95, rel=1e-5)
    assert out["hd95_fem_mm"].item() == pytest.approx(hd95 * 0.5, rel=1e-5)


def test_mask_touching_image_edge_has_boundary_there():
    a = torch.zeros(16, 16)
    a[:, :8] = 1  # left half, touching three image edges
    b = torch.zeros(16, 16)
    b[:, :6] = 1
    m = BoundaryDistance(["fem"])
    m.update(stack(a), stack(b), 1.0)
    hd, _ = brute_force(a.bool().numpy(), b.bool().numpy(), 95)
    assert hd == 2.0
    assert m.compute()["hd_fem_px"].item() == pytest.approx(2.0)
    # A mask filling the whole frame has its boundary on the image edge (else it would have none).
    full, most = torch.ones(16, 16), torch.ones(16, 16)
    most[:, 15] = 0
    m = BoundaryDistance(["fem"])
    m.update(stack(full), stack(most), 1.0)
    assert brute_force(full.bool().numpy(), most.bool().numpy(), 95)[0] == 1.0
    assert m.compute()["hd_fem_px"].item() == pytest.approx(1.0)


def test_boundary_empty_cases_and_per_sample_pixel_size():
    empty = torch.zeros(32, 32)
    m = BoundaryDistance(["fem", "tib"])
    # image 0: fem both empty (0 px, counted); tib shifted by 3 px at 0.5 mm/px
    # image 1: fem only predicted (mismatch, skipped); tib shifted by 3 px at 0.1 mm/px
    preds = torch.stack(
        [torch.stack([empty, square(10, 10, 10)]), torch.stack([square(0, 0, 5), square(10, 10, 10)])]
    )
    target = torch.stack([torch.stack([empty, square(10, 13, 10)]), torch.stack([empty, square(10, 13, 10)])])
    m.update(preds, target, torch.tensor([0.5, 0.1]))
    out = m.compute()
    assert out["hd_fem_px"].item() == 0.0
    assert out["n_empty_mismatch_fem"].item() == 1
    assert out["n_empty_mismatch_tib"].item() == 0
    assert out["hd_tib_px"].item() == pytest.approx(3.0)
    assert out["hd_tib_mm"].item() == pytest.approx((1.5 + 0.3) / 2)
    assert out["hd_mean_px"].item() == pytest.approx(1.5)
    assert all(torch.isfinite(v) for v in out.values())


def test_boundary_only_mismatches_gives_zero_not_nan():
    m = BoundaryDistance(["fem"])
    m.update(stack(torch.zeros(16, 16)), stack(square(2, 2, 4, (16, 16))), 1.0)
    out = m.compute()
    assert out["n_empty_mismatch_fem"].item() == 1
    assert all(torch.isfinite(v) and v.item() >= 0 for v in out.values())
    assert out["hd_fem_px"].item() == 0.0 and out["hd_mean_mm"].item() == 0.0


def test_boundary_accumulation_matches_single_call():
    g = torch.Generator().manual_seed(1)
    preds = torch.zeros(4, 1, 32, 32)
    target = torch.zeros(4, 1, 32, 32)
    for i in range(4):
        y, x, s = torch.randint(2, 14, (3,), generator=g).tolist()
        preds[i, 0, y : y + s + 4, x : x + s + 4] = 0.9
        target[i, 0, y + 1 : y + s + 5, x : x + s + 3] = 1
    ps = torch.tensor([0.2, 0.3, 0.4, 0.5])
    one = BoundaryDistance(["fem"])
    one.update(preds, target, ps)
    many = BoundaryDistance(["fem"])
    many.update(preds[:1], target[:1], ps[:1])
    many.update(preds[1:], target[1:], ps[1:])
    a, b = one.compute(), many.compute()
    for k in a:
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-6)
    ref = [brute_force(preds[i, 0].numpy() > 0.5, target[i, 0].numpy() > 0.5, 95) for i in range(4)]
    assert a["hd_fem_px"].item() == pytest.approx(np.mean([r[0] for r in ref]), rel=1e-5)
    assert a["hd95_fem_mm"].item() == pytest.approx(
        np.mean([r[1] * s for r, s in zip(ref, ps.tolist(), strict=True)]), rel=1e-5
    )
