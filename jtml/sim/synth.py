"""Synthetic studies: fluoroscopy-like frames of a knee replacement with exact labels and poses.

:func:`generate_study` writes a study in exactly the on-disk layout of a real one (see
:mod:`jtml.io.study`), so everything that reads real studies reads synthetic ones::

    OUT/synth_0000.tif ...                     frames, uint8 grayscale, LZW TIFF
    OUT/Labels/<part>/<frame>_label_<part>.tif masks, uint8 {0, 255}
    OUT/<part>.jts                             poses (JT_EULER_312), one row per frame
    OUT/<part>.stl                             the implant models used
    OUT/calibration.txt                        JT_INTCALIB

The masks are rendered with :class:`~jtml.geometry.SilhouetteRenderer` from the STLs and the
calibration *as written* and the poses as written (``repr`` floats round-trip exactly), so
re-rendering the study reproduces every mask pixel for pixel.

Each frame is a random knee pose: flexion 0–120° of the tibia against the femur about the
femoral condyles' flexion centre, a few degrees of varus/valgus and internal/external rotation,
a near-lateral view like the lab's (the implants' mediolateral axis close to the line of sight)
at a depth of 0.8–0.95 × the principal distance, placed so that both implants lie fully inside
the circular collimator. The image is a Beer–Lambert composite of soft tissue, cortical and
cancellous bone (femur, patella, tibia, fibula), clutter bands (table, positioning aids) and
the radio-opaque implants, blurred by a detector PSF, with quantum and electronic noise,
random contrast, brightness, gamma, vignetting, edge enhancement and a dark collimator edge.

With ``sequence=True`` the frames are instead one smooth activity of one knee
(:mod:`jtml.sim.sequence`: flexion 0 → 90 → 0° with coupled internal rotation and femoral
rollback, a slowly drifting near-lateral view), with one collimator and one look (anatomy,
clutter, contrast) for the whole study, so that only the knee and the noise change from frame to
frame; ``side="left"`` makes it a left knee, the mirror image of the right one of the same seed.

Randomness comes only from ``numpy.random.default_rng(seed)`` (one spawned stream per frame, and
for a sequence one more for the motion), so the same arguments give a byte-identical study.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import trimesh
from tqdm import tqdm

from jtml.errors import JTMLError
from jtml.geometry import Camera, SilhouetteRenderer, euler312_to_matrix
from jtml.geometry.knee import KneeGeometry, KneePose, mirror_mesh, sample_knee
from jtml.geometry.render import project_mesh
from jtml.io import (
    Calibration,
    read_calibration,
    read_stl,
    staged_dir,
    write_calibration,
    write_image,
    write_mask,
    write_poses,
    write_stl,
)
from jtml.io.study import CALIBRATION_NAME, clear_study, label_path
from jtml.sim.implants import procedural_models
from jtml.sim.sequence import SIDES, KneeMotion, plan_sequence

PARTS = ("fem", "tib")
FRAME_PREFIX = "synth"
REFERENCE_SIZE = 1024  # calibrations describe the fluoroscope imaged onto 1024 × 1024 pixels
DEFAULT_CALIBRATION = Calibration(pd=1198.0, xo=0.0, yo=0.0, pp=0.373)
MIN_SIZE, MAX_SIZE = 32, 8192
MAX_ATTEMPTS = 200  # pose samples per frame before giving up (models that cannot fit)


def default_calibration(size: int = REFERENCE_SIZE) -> Calibration:
    """The lab's fluoroscope (pd 1198 mm, no offsets, 0.373 mm pixels at 1024²) at ``size`` pixels."""
    return scaled_calibration(DEFAULT_CALIBRATION, size)


def scaled_calibration(calib: Calibration, size: int) -> Calibration:
    """A calibration for ``REFERENCE_SIZE``² frames imaged onto ``size``² pixels (same field of view)."""
    return Camera.from_calibration(calib, REFERENCE_SIZE, REFERENCE_SIZE).scaled(size, size).calibration


# --------------------------------------------------------------------------------------------
# Poses
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Image
# --------------------------------------------------------------------------------------------


def _capsule(U, V, a, b, ra, rb, fade: float = 0.0) -> np.ndarray:
    """Path length (px) through a tapered cylinder from pixel ``a`` to ``b`` (radii ``ra``, ``rb``).

    ``fade`` > 0: the first ``fade`` (a fraction of the axis) ramps in smoothly from ``a``, so a
    bone shaft blends into its epiphysis instead of ending in a cap.
    """
    ab = b - a
    t = ((U - a[0]) * ab[0] + (V - a[1]) * ab[1]) / max(float(ab @ ab), 1e-9)
    tc = np.clip(t, 0.0, 1.0)
    d2 = (U - a[0] - tc * ab[0]) ** 2 + (V - a[1] - tc * ab[1]) ** 2
    r = ra + tc * (rb - ra)
    chord = 2.0 * np.sqrt(np.maximum(r * r - d2, 0.0))
    if fade > 0:
        w = np.clip(t / fade, 0.0, 1.0)
        chord *= w * w * (3.0 - 2.0 * w)
    return chord


def _ellipsoid(U, V, c, axis, ru, rv, depth_r) -> np.ndarray:
    """Path length (px) through an ellipsoid centred at pixel ``c``, semi-axes ``ru`` along the unit
    image direction ``axis``, ``rv`` across it and ``depth_r`` along the line of sight."""
    du, dv = U - c[0], V - c[1]
    p = (du * axis[0] + dv * axis[1]) / ru
    q = (-du * axis[1] + dv * axis[0]) / rv
    return 2.0 * depth_r * np.sqrt(np.maximum(1.0 - p * p - q * q, 0.0))


class _Projector:
    """Model-frame anatomy (mm) → pixels, for one part at one pose.

    ``mirror``: the part is a left implant (the right one mirrored x → −x) and the anatomy is
    given in the right knee's model frame, so points are mirrored before the pose maps them.
    """

    def __init__(self, pose: np.ndarray, camera: Camera, scale: float, mirror: bool = False) -> None:
        self.T = np.eye(4)
        self.T[:3, :3] = euler312_to_matrix(np.asarray(pose[3:6], dtype=np.float64)).numpy()
        self.T[:3, 3] = pose[:3]
        if mirror:
            self.T = self.T @ np.diag([-1.0, 1.0, 1.0, 1.0])
        self.camera = camera
        self.scale = scale  # output pixels per camera pixel
        self.mm_per_px = -pose[2] / camera.focal_px / scale  # at the part's depth

    def __call__(self, p) -> np.ndarray:
        return project_mesh(np.asarray(p, dtype=np.float64)[None], self.T, self.camera)[0] * self.scale

    def direction(self, p, q) -> np.ndarray:
        d = self(q) - self(p)
        return d / max(float(np.linalg.norm(d)), 1e-9)

    def px(self, mm: float) -> float:
        return mm / self.mm_per_px


def _anatomy(
    rng: np.random.Generator, knee: KneePose, camera: Camera, geom: KneeGeometry, n: int, mirror: bool = False
):
    """Soft-tissue and bone attenuation (Beer–Lambert exponent) on an ``n × n`` grid over the frame.

    ``geom`` is the right knee's; ``mirror``: the poses are a left knee's (see :class:`_Projector`)."""
    scale = n / camera.width
    grid = np.arange(n, dtype=np.float64) + 0.5  # low-resolution pixel centres
    U, V = np.meshgrid(grid, grid)
    fem = _Projector(knee.fem, camera, scale, mirror)
    tib = _Projector(knee.tib, camera, scale, mirror)
    cx, cy, cz = geom.centre
    r = geom.radius
    tx, ty, tz = geom.tray_top
    jit = lambda s: 1.0 + rng.uniform(-s, s)

    # Soft tissue: thigh, knee and shank (their union: the limb's outline).
    thigh = _capsule(
        U,
        V,
        fem((cx - 8, cy, cz)),
        fem((cx - 15, cy + 450, cz)),
        fem.px(58 * jit(0.15)),
        fem.px(85 * jit(0.15)),
    )
    shank = _capsule(
        U,
        V,
        tib((tx + 5, ty, tz)),
        tib((tx + 12, ty - 450, tz)),
        tib.px(52 * jit(0.15)),
        tib.px(40 * jit(0.15)),
    )
    calf = _ellipsoid(
        U,
        V,
        tib((tx + 25, ty - 110, tz)),
        tib.direction((0, 0, 0), (0, -1, 0)),
        tib.px(90),
        tib.px(45 * jit(0.2)),
        tib.px(50),
    )
    knee_blob = _ellipsoid(
        U, V, fem((cx - 5, cy, cz)), np.array([1.0, 0.0]), fem.px(62), fem.px(62), fem.px(55)
    )
    soft = np.maximum(np.maximum(thigh, shank), np.maximum(calf, knee_blob)) * fem.mm_per_px
    mu_soft = rng.uniform(0.0012, 0.0025)

    # Bone: cortical shafts (shell + marrow), cancellous ends, patella, fibula.
    def cortical(proj, a, b, ra, rb, wall=0.38, fade=0.12):
        outer = _capsule(U, V, proj(a), proj(b), proj.px(ra), proj.px(rb), fade)
        inner = _capsule(U, V, proj(a), proj(b), proj.px(ra * (1 - wall)), proj.px(rb * (1 - wall)), fade)
        return (0.02 * (outer - inner) + 0.007 * inner) * proj.mm_per_px

    shaft_fem = cortical(fem, (cx - 11, cy + 15, cz), (cx - 16, cy + 420, cz), 15.5 * jit(0.1), 13.0)
    distal_fem = _capsule(
        U, V, fem((cx - 9, cy - 3, cz)), fem((cx - 11, cy + 70, cz)), fem.px(r * 1.35), fem.px(16.0)
    )
    shaft_tib = cortical(tib, (tx - 1, ty - 20, tz), (tx + 3, ty - 420, tz), 15.0 * jit(0.1), 11.0)
    proximal_tib = _capsule(U, V, tib((tx, ty - 4, tz)), tib((tx - 1, ty - 80, tz)), tib.px(27), tib.px(15))
    fibula = cortical(tib, (tx + 19, ty - 18, tz - 25), (tx + 14, ty - 420, tz - 25), 7.0, 6.0, wall=0.45)
    fib_head = _ellipsoid(
        U, V, tib((tx + 19, ty - 16, tz - 25)), np.array([1.0, 0.0]), tib.px(11), tib.px(10), tib.px(11)
    )
    # Patella: rides on the flange in extension, on the distal condyles in deep flexion.
    phi = np.deg2rad(-100.0 + 0.7 * knee.flexion)
    rho = 46.0 - 10.0 * min(knee.flexion, 90.0) / 90.0
    p_c = np.array([cx + rho * np.sin(phi), cy - rho * np.cos(phi), cz])
    p_axis = fem.direction(p_c, p_c + np.array([np.cos(phi), np.sin(phi), 0.0]))
    patella = _ellipsoid(U, V, fem(p_c), p_axis, fem.px(22 * jit(0.1)), fem.px(10 * jit(0.15)), fem.px(20))
    # A shaft and its epiphysis overlap: take the denser of the two, not their sum.
    mm = fem.mm_per_px
    femur = np.maximum(shaft_fem, 0.0095 * distal_fem * mm)
    tibia = np.maximum(shaft_tib, 0.0095 * proximal_tib * mm)
    bone = (femur + tibia + np.maximum(fibula, 0.006 * fib_head * mm) + 0.008 * patella * mm) * jit(0.25)
    return mu_soft * soft + bone


def _clutter(rng: np.random.Generator, n: int) -> np.ndarray:
    """0–2 straight soft-edged bands (table edge, positioning aids) on an ``n × n`` grid."""
    out = np.zeros((n, n), dtype=np.float64)
    g = np.arange(n, dtype=np.float64) + 0.5
    U, V = np.meshgrid(g, g)
    for _ in range(rng.integers(0, 3)):
        a = rng.uniform(0.0, np.pi)
        d = (U - n / 2) * np.cos(a) + (V - n / 2) * np.sin(a) - rng.uniform(-0.45, 0.45) * n
        width, soft = rng.uniform(0.02, 0.3) * n, rng.uniform(0.003, 0.02) * n
        band = 1.0 / (1.0 + np.exp(-(d + width / 2) / soft)) - 1.0 / (1.0 + np.exp(-(d - width / 2) / soft))
        out += rng.uniform(0.04, 0.25) * band
    return out


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field (~N(0, 1) at ``cells × cells`` knots, bicubic) of ``size × size``."""
    knots = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(knots, (size, size), interpolation=cv2.INTER_CUBIC)


def synthesize_frame(
    rng: np.random.Generator,
    knee: KneePose,
    masks: dict[str, np.ndarray],
    camera: Camera,
    geom: KneeGeometry,
    circle: tuple[float, float, float],
    *,
    look: np.random.Generator | None = None,
    mirror: bool = False,
) -> np.ndarray:
    """A fluoroscopy-like uint8 frame of the knee, the implants exactly where ``masks`` are.

    ``look``: the generator the frame's appearance is drawn from (anatomy sizes, clutter,
    contrast, blur, display), default ``rng``; the noise always comes from ``rng``. A sequence
    gives every frame the same ``look`` state, so that only the knee and the noise change.
    ``mirror``: a left knee (``geom`` the right knee's, see :class:`_Projector`).
    """
    p = rng if look is None else look
    size = camera.width
    n = max(64, size // 4)  # smooth anatomy is computed at low resolution, then upsampled
    low = _anatomy(p, knee, camera, geom, n, mirror) + _clutter(p, n)
    low = cv2.GaussianBlur(low, (0, 0), 1.2 * n / 256)  # soft outlines
    A = cv2.resize(low.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    # Implants: radio-opaque, darker where thicker (distance to the silhouette's edge), with a
    # smooth density variation.
    mm_per_px = -knee.fem[2] / camera.focal_px
    for mask in masks.values():
        m = mask.astype(np.uint8)
        dist = cv2.distanceTransform(m, cv2.DIST_L2, 3) * np.float32(mm_per_px)
        thick = 1.0 - np.exp(-dist / np.float32(p.uniform(1.5, 4.0)))
        base, gain = p.uniform(0.35, 0.75), p.uniform(0.25, 0.7)
        vary = np.float32(p.uniform(0.03, 0.1)) * _smooth_field(rng, size, 6)
        A += m * (np.float32(base) + np.float32(gain) * thick + vary)
    intensity = np.exp(-A * np.float32(p.uniform(0.85, 1.2)))
    # Detector blur, then quantum noise (Gaussian approximation of Poisson, binned pixels).
    sigma = p.uniform(0.4, 1.1) * size / REFERENCE_SIZE
    if sigma >= 0.3:
        intensity = cv2.GaussianBlur(intensity, (0, 0), sigma)
    photons = p.uniform(400.0, 3000.0) * (REFERENCE_SIZE / size) ** 2
    noise = rng.standard_normal((size, size), dtype=np.float32)
    intensity = np.maximum(intensity + np.sqrt(np.maximum(intensity, 0) / np.float32(photons)) * noise, 0)
    # Display: gamma, contrast/brightness, vignetting, edge enhancement.
    white, black = p.uniform(195.0, 240.0), p.uniform(0.0, 35.0)
    img = black + (white - black) * intensity ** np.float32(p.uniform(0.7, 1.4))
    g = (np.arange(size, dtype=np.float32) + 0.5) - np.float32(circle[0])
    h = (np.arange(size, dtype=np.float32) + 0.5) - np.float32(circle[1])
    r2 = (g[None, :] ** 2 + h[:, None] ** 2) / np.float32(circle[2] ** 2)
    img *= 1.0 - np.float32(p.uniform(0.0, 0.25)) * r2
    unsharp = p.uniform(0.0, 0.6)
    if unsharp > 0.05:
        img += np.float32(unsharp) * (img - cv2.GaussianBlur(img, (0, 0), 3.0 * size / REFERENCE_SIZE + 0.5))
    img += np.float32(p.uniform(0.5, 2.5)) * rng.standard_normal((size, size), dtype=np.float32)
    # Circular collimator: dark outside, a soft edge.
    edge = max(0.5, p.uniform(0.002, 0.008) * size)
    inside = np.clip(
        (np.float32(circle[2]) - np.sqrt(r2) * np.float32(circle[2])) / np.float32(edge) + 0.5, 0, 1
    )
    dark = p.uniform(0.0, 18.0)
    img = img * inside + np.float32(dark) * (1 - inside)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Study
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise JTMLError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise JTMLError(f"{name} must be {bound}, got {value}")
    return int(value)


def generate_study(
    out: Path,
    frames: int,
    seed: int,
    size: int = 1024,
    models: dict[str, Path] | None = None,
    calibration: Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    sequence: bool = False,
    side: str = "right",
) -> Path:
    """Write a synthetic study of ``frames`` frames (``size × size``) to ``out``; returns ``out``.

    ``models``: STL files by part (``"fem"``, ``"tib"``), in the lab's model frames and mm; parts
    not given use the built-in :mod:`jtml.sim.implants`. ``calibration``: a ``JT_INTCALIB``
    file for ``REFERENCE_SIZE``² (1024²) frames, scaled to ``size`` (same field of view; the
    study's ``calibration.txt`` holds the scaled values); default pd 1198 mm, no offsets,
    0.373 mm pixels at 1024². ``out`` must not exist or be empty, unless ``overwrite``: then a
    previous study's files in it are replaced. ``progress``: a tqdm bar (default: on a TTY).

    ``sequence``: the frames are one smooth knee motion (:mod:`jtml.sim.sequence`: flexion
    0 → 90 → 0° with coupled internal rotation and rollback, a slowly drifting view, one
    collimator and one look for the whole study) instead of independent random knees. ``side``
    (sequences only): ``"right"`` or ``"left"``; a left study's built-in implants are the right
    ones mirrored x → −x (given ``models`` are taken as they are: left implants) and its poses
    the mirror image of the right study of the same seed.
    Same arguments, same bytes. Bad input raises :class:`JTMLError` before anything is written.
    """
    frames = _check_int("frames", frames, 1)
    seed = _check_int("seed", seed, 0)
    size = _check_int("size", size, MIN_SIZE, MAX_SIZE)
    if side not in SIDES:
        raise JTMLError(f"side must be 'left' or 'right', got {side!r}")
    if side == "left" and not sequence:
        raise JTMLError("--side left needs --sequence: random studies are right knees")
    left = side == "left"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise JTMLError("output path exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise JTMLError("output folder is not empty (use --overwrite to replace the study in it)", out)
    models = dict(models or {})
    unknown = sorted(set(models) - set(PARTS))
    if unknown:
        raise JTMLError(f"unknown part(s) {', '.join(unknown)}: synthetic studies have {' and '.join(PARTS)}")
    meshes = procedural_models()
    if left:
        meshes = {part: mirror_mesh(mesh) for part, mesh in meshes.items()}
    for part, path in models.items():
        meshes[part] = read_stl(path)
    calib = (
        default_calibration(size)
        if calibration is None
        else scaled_calibration(read_calibration(calibration), size)
    )

    names = [f"{FRAME_PREFIX}_{i:0{max(4, len(str(frames - 1)))}d}.tif" for i in range(frames)]
    root = np.random.default_rng(seed)
    streams = root.spawn(frames)
    with staged_dir(out) as stage:
        for part in PARTS:
            write_stl(stage / f"{part}.stl", meshes[part])
        write_calibration(stage / CALIBRATION_NAME, calib)
        # Render from the files as written (float32 STL vertices), so the study is self-consistent.
        written = {part: read_stl(stage / f"{part}.stl") for part in PARTS}
        camera = Camera.from_calibration(read_calibration(stage / CALIBRATION_NAME), size, size)
        renderers = {part: SilhouetteRenderer(written[part], camera) for part in PARTS}
        vertices = {
            part: np.unique(np.asarray(written[part].vertices, dtype=np.float64), axis=0) for part in PARTS
        }
        # The knee's geometry is read off right implants (a left study's, mirrored back).
        right = {part: mirror_mesh(m) for part, m in written.items()} if left else written
        geom = KneeGeometry.from_models(right["fem"], right["tib"])
        margin = max(2.0, 0.03 * size)
        plan = plan_study_sequence(seed, frames, written, camera, side, calibration) if sequence else None
        poses = {part: np.zeros((frames, 6)) for part in PARTS}
        show = sys.stderr.isatty() if progress is None else progress
        for i in tqdm(range(frames), desc="synth", unit="frame", disable=not show):
            rng = streams[i]
            if plan is not None:
                knee = plan.knees[i]
                masks = {part: renderers[part].render(getattr(knee, part)) for part in PARTS}
                if not all(m.any() for m in masks.values()):
                    raise JTMLError(
                        f"frame {i}: an implant renders to no pixel at {size}x{size}", calibration
                    )
                look = np.random.default_rng(plan.look_seed)
                image = synthesize_frame(rng, knee, masks, camera, geom, plan.circle, look=look, mirror=left)
            else:
                circle = (
                    size / 2 + rng.normal(0.0, 0.01) * size,
                    size / 2 + rng.normal(0.0, 0.01) * size,
                    rng.uniform(0.44, 0.53) * size,
                )
                for _ in range(MAX_ATTEMPTS):
                    knee = sample_knee(rng, geom, vertices, camera, circle, margin)
                    if knee is None:
                        continue
                    masks = {
                        "fem": renderers["fem"].render(knee.fem),
                        "tib": renderers["tib"].render(knee.tib),
                    }
                    if all(m.any() for m in masks.values()):
                        break
                else:
                    raise JTMLError(_NO_FIT.format(size=size, attempts=MAX_ATTEMPTS), calibration)
                image = synthesize_frame(rng, knee, masks, camera, geom, circle)
            frame = stage / names[i]
            write_image(frame, image)
            for part in PARTS:
                write_mask(label_path(stage, part, frame), masks[part])
                poses[part][i] = getattr(knee, part)
        for part in PARTS:
            write_poses(stage / f"{part}.jts", poses[part])
        if out.is_dir():
            clear_study(out, extra=tuple(f"{part}.stl" for part in PARTS))
    return out


_NO_FIT = (
    "cannot fit both implants inside the {size}x{size} field of view after {attempts} "
    "tries: are the models in mm, in the lab's model frames, and is the pixel size right?"
)


@dataclass(frozen=True)
class SequencePlan:
    """A sequence study's knees (the poses written), the right-knee motion they follow (the
    generator's truth: flexion, abduction, internal rotation per frame), its collimator circle
    and the seed of its look."""

    knees: list[KneePose]
    motion: KneeMotion
    circle: tuple[float, float, float]
    look_seed: int


def plan_study_sequence(
    seed: int,
    frames: int,
    models: dict[str, trimesh.Trimesh],
    camera: Camera,
    side: str = "right",
    source: Path | None = None,
) -> SequencePlan:
    """The knee motion :func:`generate_study` writes for ``sequence=True``: ``models`` the study's
    ``side`` implants as written (``fem.stl``, ``tib.stl``), ``camera`` its calibration at the
    frame size. From the stream of ``seed`` after the frames' (the same for both sides, so a left
    study mirrors the right one of the same seed); ``source`` is named if nothing fits."""
    left = side == "left"
    root = np.random.default_rng(seed)
    root.spawn(frames)  # the frames' noise streams come first, as in generate_study
    rng = root.spawn(1)[0]
    vertices = {
        part: np.unique(np.asarray(models[part].vertices, dtype=np.float64), axis=0) for part in PARTS
    }
    # The knee's geometry is read off right implants (a left study's, mirrored back).
    right = {part: mirror_mesh(models[part]) for part in PARTS} if left else models
    geom = KneeGeometry.from_models(right["fem"], right["tib"])
    size = camera.width
    margin = max(2.0, 0.03 * size)
    u0 = camera.principal_point[0]
    for _ in range(MAX_ATTEMPTS):
        cu = size / 2 + rng.normal(0.0, 0.01) * size
        circle = (
            2.0 * u0 - cu if left else cu,
            size / 2 + rng.normal(0.0, 0.01) * size,
            rng.uniform(0.44, 0.53) * size,
        )
        look_seed = int(rng.integers(0, 2**63))
        plan = plan_sequence(rng, frames, geom, vertices, camera, circle, margin, side)
        if plan is not None:
            return SequencePlan(plan[0], plan[1], circle, look_seed)
    raise JTMLError(_NO_FIT.format(size=size, attempts=MAX_ATTEMPTS), source)


__all__ = [
    "DEFAULT_CALIBRATION",
    "PARTS",
    "REFERENCE_SIZE",
    "SequencePlan",
    "default_calibration",
    "generate_study",
    "plan_study_sequence",
    "scaled_calibration",
    "synthesize_frame",
]
