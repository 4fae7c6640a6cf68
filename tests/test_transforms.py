"""YAML-declared albumentations pipelines, strict argument checking and the fast elastic transform."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest
import yaml

from jtml.data.transforms import (
    FastElasticTransform,
    build_transforms,
    elastic_displacement,
    lab_recipe,
    lab_recipe_spec,
)
from jtml.errors import JTMLError

YAML_LIST = """
train_transforms:
  - name: RandomGamma
    params: {gamma_limit: [80, 120], p: 0.5}
  - HorizontalFlip
  - name: OneOf
    params: {p: 0.3}
    transforms:
      - {name: Blur, params: {blur_limit: [3, 7]}}
      - {name: GaussianBlur, params: {sigma_limit: [0.5, 2.0]}}
  - name: Affine
    params: {rotate: [-180, 180], border_mode: cv2.BORDER_CONSTANT, p: 1.0}
"""


def test_yaml_list_and_recipe_names():
    spec = yaml.safe_load(YAML_LIST)["train_transforms"]
    compose = build_transforms(spec, seed=0)
    assert [type(t).__name__ for t in compose.transforms] == [
        "RandomGamma",
        "HorizontalFlip",
        "OneOf",
        "Affine",
    ]
    assert compose.transforms[3].border_mode == cv2.BORDER_CONSTANT
    out = compose(image=np.zeros((32, 32), np.uint8), mask=np.zeros((32, 32, 2), np.uint8))
    assert out["image"].shape == (32, 32) and out["mask"].shape == (32, 32, 2)
    assert build_transforms(yaml.safe_load("t: none")["t"]) is None and build_transforms(None) is None
    names = [type(t).__name__ for t in build_transforms("lab").transforms]
    assert "FastElasticTransform" in names and "ElasticTransform" not in names
    assert "ElasticTransform" in [type(t).__name__ for t in build_transforms("lab_exact").transforms]


@pytest.mark.parametrize(
    "spec, message",
    [
        # legacy albumentations 1.x arguments: only rejected because of strict=True
        ([{"name": "Affine", "params": {"mode": 0}}], r"\[0\] Affine: .*'mode' .*not valid"),
        (
            ["HorizontalFlip", {"name": "ElasticTransform", "params": {"alpha_affine": 50}}],
            r"\[1\] ElasticTransform: .*'alpha_affine'",
        ),
        ([{"name": "FastElasticTransform", "params": {"approximate": True}}], r"'approximate'"),
        (
            [{"name": "RandomGamma", "params": {"gamma_limit": "high"}}],
            r"RandomGamma: argument 'gamma_limit'",
        ),
        ([{"name": "Blur", "params": {"p": 2}}], r"Blur: argument 'p' = 2"),
        ([{"name": "FastElasticTransform", "params": {"sigma": 0}}], r"argument 'sigma' = 0"),
        ([{"name": "RandomGama"}], r"unknown transform 'RandomGama'; did you mean RandomGamma"),
        ([{"name": "Affine", "params": {"border_mode": "cv2.BORDER_NOPE"}}], r"unknown OpenCV constant"),
        ([{"name": "Affine", "parms": {}}], r"unknown key\(s\) \['parms'\]"),
        ([{"name": "OneOf", "params": {"q": 1}, "transforms": ["HorizontalFlip"]}], r"OneOf: .*'q'"),
        ([{"name": "OneOf", "params": {}}], r"needs a 'transforms' list"),
        ("lab2", r"unknown recipe 'lab2'"),
        ({"name": "Blur"}, r"expected a list"),
    ],
)
def test_bad_specs_raise_jtml_errors_naming_the_culprit(spec, message):
    with pytest.raises(JTMLError, match=message) as err:
        build_transforms(spec, where="train_transforms")
    assert str(err.value).startswith("train_transforms")


def test_albumentations_without_strict_still_drops_a_legacy_argument():
    """Canary for why jtml builds every transform with ``strict=True``: albumentations on its own only
    warns about an argument the transform lacks and drops it, so a 1.x ``mode: cv2.BORDER_REFLECT_101``
    would silently train with the default constant border. If this fails, albumentations changed that
    behaviour: revisit ``jtml.data.transforms`` (its strict handling and docstring)."""
    with pytest.warns(UserWarning, match=r"^Argument\(s\) 'mode' are not valid for transform Affine$"):
        lax = A.Affine(mode=cv2.BORDER_REFLECT_101, rotate=(30, 30), p=1.0)
    assert lax.border_mode == cv2.BORDER_CONSTANT  # the requested border is gone, not just renamed
    with pytest.raises(ValueError, match=r"'mode' are not valid for transform Affine"):
        A.Affine(mode=cv2.BORDER_REFLECT_101, strict=True)  # what build_transforms turns into a JTMLError


@pytest.mark.parametrize("size", [64, 256, 1024])
def test_lab_recipe_scales_and_keeps_masks_binary(size):
    spec = lab_recipe_spec(image_size=size)
    elastic = next(e for e in spec if e["name"] == "FastElasticTransform")["params"]
    s = size / 1024
    assert elastic["sigma"] == pytest.approx(150 * s) and elastic["alpha"] == pytest.approx(3000 * s * s)
    if size > 256:
        return
    compose = lab_recipe(False, image_size=size, seed=0)
    yy, xx = np.mgrid[:size, :size]
    mask = np.stack([(yy - size / 3) ** 2 + (xx - size / 3) ** 2 < (size / 6) ** 2, yy > 0.7 * size], -1)
    image = np.where(mask.any(-1), 40, 200).astype(np.uint8)
    for _ in range(20):
        out = compose(image=image, mask=mask.astype(np.uint8))
        assert out["image"].dtype == np.uint8 and out["mask"].shape == (size, size, 2)
        assert set(np.unique(out["mask"]).tolist()) <= {0, 1}


# ------------------------------------------------------------------------------------ elastic


def _measure(transform, draws: int, size: int = 256) -> dict[str, np.ndarray]:
    """Warp a coordinate image ``(x/W, y/H, 1)`` and read the displacement back at every pixel.

    Linear interpolation of a linear ramp is exact, so ``out·size − grid`` is the field the warp
    applied; pixels whose source fell (partly) outside the frame are left out of both sides alike.
    """
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    image = np.dstack([xx / size, yy / size, np.ones_like(xx)]).astype(np.float32)
    q, e = size // 8, size - size // 8  # corner blocks and edge bands are q pixels deep
    mid = slice(3 * q, 5 * q)
    regions = {  # all four corners and edges: they are nearly independent, so pooling them helps
        "centre": [(mid, mid)],
        "edge": [(slice(0, q), mid), (slice(e, size), mid), (mid, slice(0, q)), (mid, slice(e, size))],
        "corner": [(ys, xs) for ys in (slice(0, q), slice(e, size)) for xs in (slice(0, q), slice(e, size))],
    }
    sums = {k: [0.0, 0] for k in regions}
    mags, rough = [], []
    for _ in range(draws):
        out = transform(image=image)["image"]
        valid = out[..., 2] > 0.999
        d = np.dstack([out[..., 0] * size - xx, out[..., 1] * size - yy])
        mag = np.hypot(d[..., 0], d[..., 1])
        for k, blocks in regions.items():
            for ys, xs in blocks:
                v = valid[ys, xs]
                sums[k][0] += float((mag[ys, xs][v] ** 2).sum())
                sums[k][1] += int(v.sum())
        mags.append(mag[valid][::7])
        lag = size // 16  # smoothness: mean squared change over a short step, relative to the power
        both = valid[:, lag:] & valid[:, :-lag]
        rough.append(float(((d[:, lag:] - d[:, :-lag]) ** 2).sum(-1)[both].mean() / (mag[valid] ** 2).mean()))
    stats = {f"rms_{k}": np.sqrt(s / max(n, 1)) for k, (s, n) in sums.items()}
    stats["quantiles"] = np.quantile(np.concatenate(mags), [0.25, 0.5, 0.9, 0.99])
    stats["roughness"] = np.median(rough)
    return stats


def _equivalent(a: dict, b: dict, tol: float = 0.15) -> list[str]:
    bad = []
    for k in a:
        ra, rb = np.atleast_1d(a[k]), np.atleast_1d(b[k])
        if np.any(np.abs(ra - rb) > tol * np.abs(rb)):
            bad.append(f"{k}: {np.round(ra, 3)} vs {np.round(rb, 3)}")
    return bad


def test_fast_elastic_is_statistically_equivalent_to_exact():
    """At 256² with the lab's sigma scaled (150 px at 1024² → 37.5): same displacement size in the
    centre, along the edges and in the corners (where the exact blur's replicated border
    dominates), same magnitude quantiles and smoothness. ``approximate=True`` (17×17 kernel) and
    a field blurred at 1/8 resolution then upsampled both fail the same check."""
    kw = dict(alpha=1000.0, sigma=37.5, p=1.0, border_mode=cv2.BORDER_CONSTANT)
    exact = _measure(A.Compose([A.ElasticTransform(**kw)], seed=1), draws=120)
    fast = _measure(A.Compose([FastElasticTransform(**kw)], seed=2), draws=120)
    assert _equivalent(fast, exact) == []
    approx = _measure(A.Compose([A.ElasticTransform(approximate=True, **kw)], seed=3), draws=40)
    assert len(_equivalent(approx, exact)) >= 3

    class LowRes(A.ElasticTransform):
        def get_params_dependent_on_data(self, params, data):
            h, w = params["shape"][:2]
            small = A.augmentations.geometric.functional.generate_displacement_fields(
                (h // 8, w // 8),
                self.alpha / 8,
                self.sigma / 8,
                False,
                (0, 0),
                self.random_generator,
                "gaussian",
            )
            dx, dy = (cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR) for f in small)
            return {
                "map_x": dx + np.arange(w, dtype=np.float32),
                "map_y": dy + np.arange(h, dtype=np.float32)[:, None],
            }

    lowres = _measure(A.Compose([LowRes(**kw)], seed=4), draws=40)
    assert len(_equivalent(lowres, exact)) >= 2


def test_fast_elastic_field_matches_exact_variance_profile():
    """Second moments region by region (a zero-mean Gaussian field's full description), straight
    from the fields, corners included; plus ``approximate=True`` failing the same comparison."""
    rng = np.random.default_rng(0)
    gen = A.augmentations.geometric.functional.generate_displacement_fields
    n, shape, sigma = 2000, (64, 48), 12.0

    def variance(sample):
        return sum(np.square(np.stack(sample())) for _ in range(n)) / n

    def pool(v):  # 8×8 blocks, to tame sampling noise
        return v.reshape(2, 8, 8, 6, 8).mean(axis=(2, 4))

    exact = pool(variance(lambda: gen(shape, 1.0, sigma, False, (0, 0), rng, "gaussian")))
    fast = pool(variance(lambda: elastic_displacement(shape, 1.0, sigma, False, rng)))
    assert exact.max() / exact.min() > 30  # the replicated border makes corners ~50x the centre
    np.testing.assert_allclose(fast, exact, rtol=0.25)
    approx = pool(
        sum(np.square(np.stack(gen(shape, 1.0, sigma, False, (17, 17), rng, "gaussian"))) for _ in range(200))
        / 200
    )
    assert np.abs(approx / exact - 1).max() > 1
    dx, dy = elastic_displacement(shape, 1.0, sigma, True, rng)
    assert dx is dy
