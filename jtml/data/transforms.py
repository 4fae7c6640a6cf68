"""Albumentations pipelines declared as YAML lists, and the lab's JTML training recipe.

A pipeline is a list of entries, each ``{name: <transform>, params: {...}}``; a bare string is an
entry without params, and the compositions ``OneOf``, ``SomeOf``, ``Sequential`` and
``OneOrOther`` take their children under ``transforms``::

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
        params: {rotate: [-180, 180], border_mode: cv2.BORDER_CONSTANT}

``name`` is any albumentations transform or :class:`FastElasticTransform`; string values written
``cv2.NAME`` become the OpenCV constant. Instead of a list, ``"lab"`` (the lab recipe with the
fast elastic), ``"lab_exact"`` (the exact elastic) or ``"none"`` can be given.

Every transform is built with ``strict=True``: albumentations (2.x) then raises on arguments the
transform does not have (e.g. the 1.x ``alpha_affine`` or ``mode``), which it would otherwise
only warn about and drop. Value errors are raised by its pydantic schemas either way. Both, and
unknown names, become a :class:`JTMLError` naming the entry, the transform and the argument.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import cv2
import numpy as np
import torch

# albumentations asks PyPI for a newer version on import; jtml must not talk to the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
from albumentations.augmentations.geometric.distortion import BaseDistortion  # noqa: E402
from pydantic import Field, ValidationError  # noqa: E402

from jtml.errors import JTMLError  # noqa: E402

RECIPES = ("lab", "lab_exact", "none")
COMPOSITIONS = ("OneOf", "SomeOf", "Sequential", "OneOrOther")
LAB_SIZE = 1024
"""The frame size (pixels) the lab recipe's pixel-valued parameters were chosen for."""


# --------------------------------------------------------------------------------------------
# Fast elastic deformation, equal in distribution to ElasticTransform(approximate=False)
# --------------------------------------------------------------------------------------------


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """The ``n × n`` matrix of ``cv2.GaussianBlur(·, (0, 0), sigma, BORDER_REPLICATE)`` along one axis.

    Same kernel as OpenCV uses for float images (``ksize = round(8σ + 1) | 1``); taps that fall
    outside ``[0, n)`` are clamped onto the edge samples, which is what replicate means.
    """
    ksize = int(round(sigma * 8 + 1)) | 1
    radius = ksize // 2
    kernel = cv2.getGaussianKernel(ksize, sigma, cv2.CV_32F).ravel().astype(np.float64)
    rows = np.arange(n)[:, None]
    cols = np.clip(rows + np.arange(-radius, radius + 1)[None, :], 0, n - 1)
    out = np.zeros((n, n))
    np.add.at(out, (np.broadcast_to(rows, cols.shape), cols), np.broadcast_to(kernel, cols.shape))
    return out


@functools.lru_cache(maxsize=16)
def _blur_factor(n: int, sigma: float) -> torch.Tensor:
    """``L`` (n × r) with ``L Lᵀ ≈ B Bᵀ`` for the blur matrix ``B``, dropping < 1e-7 of the variance.

    ``B Bᵀ`` is the covariance a Gaussian blur gives white noise along one axis. A wide blur
    leaves only a few dozen non-negligible modes (σ 150 px over 1024 px: ~10), found by a
    randomized SVD in a few ms; the rank grows until the dropped variance is below 1e-7, far
    below anything visible (the field's RMS changes by < 1e-7 relative).
    """
    b = _blur_matrix(n, sigma)
    total = float(np.square(b).sum())
    rng = np.random.default_rng(0)
    k = min(32, n)
    while True:
        y = b @ rng.standard_normal((n, k))
        for _ in range(2):  # power iterations sharpen the captured subspace
            q, _ = np.linalg.qr(y)
            y = b @ (b.T @ q)
        q, _ = np.linalg.qr(y)
        u, s, _ = np.linalg.svd(q.T @ b, full_matrices=False)
        kept = np.cumsum(np.square(s)) / total
        if kept[-1] > 1 - 1e-7 or k >= n:
            break
        k = min(2 * k, n)
    r = min(int(np.searchsorted(kept, 1 - 1e-7)) + 1, len(s))
    return torch.from_numpy(np.ascontiguousarray((q @ u[:, :r]) * s[:r], dtype=np.float32))


def _sample_abs_normal_max(n: int, rng: np.random.Generator) -> float:
    """A draw of ``max |z|`` over ``n`` iid standard normals, by inverting its CDF ``(2Φ(m) − 1)ⁿ``."""
    u = max(float(rng.random()), 1e-300)
    tail = -math.expm1(math.log(u) / n) / 2.0  # P(z > m), computed without cancellation
    return -statistics.NormalDist().inv_cdf(min(max(tail, 1e-300), 0.5))


def elastic_displacement(
    shape: tuple[int, int], alpha: float, sigma: float, same_dxdy: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Displacement fields ``(dx, dy)`` distributed as albumentations' exact ElasticTransform's.

    The exact fields are ``alpha · GaussianBlur(N) / max|N|`` for white noise ``N`` of shape
    ``(2H, W)`` (dx stacked on dy, blurred as ONE image with replicate borders: the two fields
    touch at their seam) or ``(H, W)`` with ``same_dxdy``. Blurring is linear and separable, so
    ``GaussianBlur(N) = B_rows · N · B_colsᵀ``: a zero-mean Gaussian field whose covariance is
    ``(B_rows B_rowsᵀ) ⊗ (B_cols B_colsᵀ)``. ``L_rows · Z · L_colsᵀ`` with a small iid ``Z`` has the
    same covariance (see :func:`_blur_factor`), hence the same distribution, edge effects included
    (with σ = 150 px the replicated edge samples dominate the field near the borders, which
    ``approximate=True``'s 17×17 kernel or a blurred low-resolution field do not reproduce).
    ``max|N|`` is drawn from its exact law; its dependence on the field is negligible.
    """
    h, w = shape
    rows = h if same_dxdy else 2 * h
    lr, lc = _blur_factor(rows, float(sigma)), _blur_factor(w, float(sigma))
    z = torch.from_numpy(rng.standard_normal((lr.shape[1], lc.shape[1]), dtype=np.float32))
    # torch, not numpy: DataLoader workers run torch single-threaded, numpy's BLAS would not be
    field = ((lr @ z) @ lc.T).numpy()
    field *= np.float32(alpha / _sample_abs_normal_max(rows * w, rng))
    return (field, field) if same_dxdy else (field[:h], field[h:])


class FastElasticTransform(A.ElasticTransform):
    """``ElasticTransform`` (exact, gaussian noise) with the same field distribution at ~1/100 the cost.

    Takes ElasticTransform's arguments except ``approximate`` and ``noise_distribution`` (it is
    the exact, gaussian one). The field is sampled by :func:`elastic_displacement`; warping the
    image and masks is ElasticTransform's own code (masks nearest by default).
    """

    class InitSchema(BaseDistortion.InitSchema):
        alpha: Annotated[float, Field(ge=0)]
        sigma: Annotated[float, Field(ge=1)]
        same_dxdy: bool

    def __init__(
        self,
        alpha: float = 1,
        sigma: float = 50,
        interpolation: int = cv2.INTER_LINEAR,
        same_dxdy: bool = False,
        mask_interpolation: int = cv2.INTER_NEAREST,
        keypoint_remapping_method: Literal["direct", "mask"] = "mask",
        border_mode: int = cv2.BORDER_CONSTANT,
        fill: tuple[float, ...] | float = 0,
        fill_mask: tuple[float, ...] | float = 0,
        p: float = 0.5,
    ):
        BaseDistortion.__init__(
            self,
            interpolation=interpolation,
            mask_interpolation=mask_interpolation,
            keypoint_remapping_method=keypoint_remapping_method,
            p=p,
            border_mode=border_mode,
            fill=fill,
            fill_mask=fill_mask,
        )
        self.alpha = alpha
        self.sigma = sigma
        self.same_dxdy = same_dxdy
        self.approximate = False
        self.noise_distribution = "gaussian"

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        dx, dy = elastic_displacement((h, w), self.alpha, self.sigma, self.same_dxdy, self.random_generator)
        dx += np.arange(w, dtype=np.float32)[None, :]
        dy += np.arange(h, dtype=np.float32)[:, None]
        return {"map_x": dx, "map_y": dy}


# --------------------------------------------------------------------------------------------
# The lab recipe
# --------------------------------------------------------------------------------------------


def _odd(x: float) -> int:
    return max(3, int(round(x)) | 1)


def lab_recipe_spec(exact_elastic: bool = False, image_size: int = LAB_SIZE) -> list[dict[str, Any]]:
    """The lab's JTML training augmentation as a YAML-style list (see the module docstring).

    Chosen for 1024² frames (the lab trains at full resolution: ``image_size: 1024``). At other
    sizes the pixel-valued parameters are rescaled by ``s = image_size / 1024`` so the
    deformations stay the same relative to the frame: blur kernels and elastic ``sigma`` by ``s``
    and elastic ``alpha`` by ``s²`` (interior displacement ∝ alpha / sigma). At 1024² the elastic
    field (σ 150, α 3000) moves pixels by a median ~4 px: ~1.6 px RMS mid-frame, ~13 px at the
    middle of the edges and ~150 px in the corners, where albumentations' replicate-border blur
    of the noise dominates (the fast version reproduces this, see :func:`elastic_displacement`).
    The parameters are sensible choices, not the lab's code verified line by line.
    """
    s = image_size / LAB_SIZE
    elastic = {"alpha": 3000.0 * s * s, "sigma": 150.0 * s, "p": 0.5}
    return [
        {"name": "RandomGamma", "params": {"gamma_limit": [80, 120], "p": 0.5}},
        {
            "name": "Affine",
            "params": {
                "rotate": [-180, 180],
                "scale": [0.9, 1.1],
                "translate_percent": [-0.05, 0.05],
                "border_mode": cv2.BORDER_CONSTANT,
                "fill": 0,
                "fill_mask": 0,
                "p": 0.8,
            },
        },
        {"name": "Blur", "params": {"blur_limit": [3, _odd(7 * s)], "p": 0.3}},
        {"name": "HorizontalFlip", "params": {"p": 0.5}},
        {"name": "VerticalFlip", "params": {"p": 0.5}},
        {"name": "ElasticTransform" if exact_elastic else "FastElasticTransform", "params": elastic},
        {"name": "InvertImg", "params": {"p": 0.2}},
        {
            "name": "CoarseDropout",
            "params": {
                "num_holes_range": [1, 6],
                "hole_height_range": [0.02, 0.08],
                "hole_width_range": [0.02, 0.08],
                "fill": 0,
                "p": 0.3,
            },
        },
        {"name": "MultiplicativeNoise", "params": {"multiplier": [0.9, 1.1], "elementwise": True, "p": 0.3}},
    ]


def lab_recipe(exact_elastic: bool = False, image_size: int = LAB_SIZE, seed: int | None = None) -> A.Compose:
    """The built lab recipe; ``exact_elastic``: albumentations' exact elastic (1.5–4 s per 1024² frame)."""
    return build_transforms(lab_recipe_spec(exact_elastic, image_size), seed=seed)


# --------------------------------------------------------------------------------------------
# Building pipelines from YAML
# --------------------------------------------------------------------------------------------


def _resolve_value(value: Any, where: str) -> Any:
    if isinstance(value, str) and value.startswith("cv2."):
        const = getattr(cv2, value[4:], None)
        if not isinstance(const, int):
            raise JTMLError(f"{where}: unknown OpenCV constant {value!r}")
        return const
    if isinstance(value, list):
        return [_resolve_value(v, where) for v in value]
    if isinstance(value, Mapping):
        return {k: _resolve_value(v, where) for k, v in value.items()}
    return value


def _transform_class(name: str, where: str) -> type:
    if name == "FastElasticTransform":
        return FastElasticTransform
    cls = getattr(A, name, None)
    if isinstance(cls, type) and issubclass(cls, (A.BasicTransform, A.BaseCompose)):
        return cls
    known = [
        n for n in dir(A) if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), A.BasicTransform)
    ]
    close = difflib.get_close_matches(name, [*known, "FastElasticTransform"], n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise JTMLError(f"{where}: unknown transform {name!r}{hint}")


def _explain(e: Exception) -> str:
    """The bad argument(s) and why, from albumentations' ValueError or the pydantic error behind it."""
    cause = e if isinstance(e, ValidationError) else e.__cause__
    if not isinstance(cause, ValidationError):
        return str(e).strip()
    found: dict[str, tuple[Any, list[str]]] = {}
    for err in cause.errors():
        loc = err.get("loc") or ("?",)
        arg = str(loc[0])  # later loc items name union branches, not arguments
        found.setdefault(arg, (err.get("input"), []))[1].append(str(err.get("msg")))
    return "; ".join(f"argument {a!r} = {v!r}: {' / '.join(dict.fromkeys(m))}" for a, (v, m) in found.items())


def _build_entry(entry: Any, where: str) -> A.BasicTransform | A.BaseCompose:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise JTMLError(f"{where}: expected {{name: <transform>, params: {{...}}}}, got {entry!r}")
    extra = sorted(set(entry) - {"name", "params", "transforms"})
    if extra:
        raise JTMLError(
            f"{where} ({entry['name']}): unknown key(s) {extra}; expected name, params, transforms"
        )
    name = entry["name"]
    where = f"{where} {name}"
    params = entry.get("params") or {}
    if not isinstance(params, Mapping):
        raise JTMLError(f"{where}: params must be a mapping, got {params!r}")
    params = _resolve_value(dict(params), where)
    cls = _transform_class(name, where)
    is_compose = issubclass(cls, A.BaseCompose)
    if is_compose != ("transforms" in entry):
        need = "needs a 'transforms' list" if is_compose else "takes no 'transforms' (only compositions do)"
        raise JTMLError(f"{where}: {need}")
    if is_compose:
        if name not in COMPOSITIONS:
            raise JTMLError(f"{where}: only {', '.join(COMPOSITIONS)} can be nested")
        children = _build_list(entry["transforms"], f"{where}.transforms")
        try:  # compositions take no `strict`; bind the signature so unknown arguments still fail
            inspect.signature(cls).bind(children, **params)
            return cls(children, **params)
        except (TypeError, ValueError, ValidationError) as e:
            raise JTMLError(f"{where}: {_explain(e)}") from None
    try:
        return cls(**params, strict=True)
    except (TypeError, ValueError, ValidationError) as e:
        raise JTMLError(f"{where}: {_explain(e)}") from None


def _build_list(spec: Any, where: str) -> list:
    if not isinstance(spec, Sequence) or isinstance(spec, str):
        raise JTMLError(f"{where}: expected a list of transforms, got {spec!r}")
    return [_build_entry(entry, f"{where}[{i}]") for i, entry in enumerate(spec)]


def build_transforms(
    spec: str | Sequence[Any] | None,
    seed: int | None = None,
    image_size: int = LAB_SIZE,
    where: str = "transforms",
) -> A.Compose | None:
    """A ``Compose`` from a recipe name or YAML list (module docstring); ``None`` for no augmentation.

    ``image_size`` only scales the named lab recipes (see :func:`lab_recipe_spec`).
    """
    if spec is None or (isinstance(spec, str) and spec == "none"):
        return None
    if isinstance(spec, str):
        if spec not in RECIPES:
            raise JTMLError(f"{where}: unknown recipe {spec!r}; expected one of {RECIPES} or a list")
        spec = lab_recipe_spec(exact_elastic=spec == "lab_exact", image_size=image_size)
    transforms = _build_list(spec, where)
    try:
        return A.Compose(transforms, strict=True, seed=seed)
    except (TypeError, ValueError) as e:
        raise JTMLError(f"{where}: {_explain(e)}") from None


def check_pose_consistent(transform: Any, where: str = "train_transforms") -> None:
    """Refuse any transform that is not pixel-level: spatial ones change the silhouette without a pose."""
    import albumentations as A

    def walk(t: Any) -> None:
        if isinstance(t, A.BaseCompose):
            for child in t.transforms:
                walk(child)
        elif not isinstance(t, A.ImageOnlyTransform):
            raise JTMLError(
                f"{where}: {type(t).__name__} is not pose-consistent for pose data: it moves pixels, so the "
                "silhouette would no longer match its pose (a flip mirrors the implant, elastic/shear/affine "
                "warps are no rigid motion, a crop moves the principal point). Use rotation_range (exact "
                "in-plane rotation) and roi_jitter (exact ROI shift/scale) instead; only pixel-level "
                "transforms (noise, blur, gamma, contrast, …) are allowed here"
            )

    if transform is not None:
        walk(transform)
