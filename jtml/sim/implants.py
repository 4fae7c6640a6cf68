"""Built-in procedural knee implants: the default models of synthetic studies.

Generated in code (no data files), deterministic, in mm and in the model frames of the lab's
real CAD models: ``x`` anterior (−) to posterior (+), ``y`` distal (−) to proximal (+), ``z``
mediolateral. Like ``KR_right_7_fem.stl`` the femoral component spans about x [−42, 25],
y [−25, 35], z [−36, 36]; like ``KR_right_6_tib.stl`` the tibial component spans x [−24.5, 24.5],
y [−29.7, 3], z [−37, 37], its tray top at y = 3 and its keel pointing to −y.

Each component is a union of closed (watertight, outward-facing) lofted solids, concatenated
without a boolean union: overlapping closed parts are all a silhouette renderer needs.
"""

from __future__ import annotations

import numpy as np
import trimesh

# Femoral design parameters (mm): the distal/posterior condyles follow a circle of outer
# radius FEMUR_RADIUS about FEMUR_CENTER in the sagittal (x, y) plane.
FEMUR_CENTER = (1.5, -1.5)
FEMUR_RADIUS = 23.5
FEMUR_THICKNESS = 7.0


def _loft(sections: np.ndarray) -> trimesh.Trimesh:
    """Closed mesh through ``(S, K, 3)`` rings (each a closed loop of K points), capped at both ends.

    Caps are fans about each end ring's centroid, so end rings must be star-shaped about it.
    Faces are oriented outwards (positive volume).
    """
    S, K, _ = sections.shape
    verts = np.concatenate([sections.reshape(-1, 3), sections[0].mean(0)[None], sections[-1].mean(0)[None]])
    s, k = np.meshgrid(np.arange(S - 1), np.arange(K), indexing="ij")
    a = s * K + k
    b = s * K + (k + 1) % K
    c = a + K
    d = b + K
    side = np.concatenate([np.stack([a, b, d], -1).reshape(-1, 3), np.stack([a, d, c], -1).reshape(-1, 3)])
    ring = np.arange(K)
    start, end = S * K, S * K + 1
    cap0 = np.stack([np.full(K, start), (ring + 1) % K, ring], -1)
    cap1 = np.stack([np.full(K, end), (S - 1) * K + ring, (S - 1) * K + (ring + 1) % K], -1)
    faces = np.concatenate([side, cap0, cap1]).astype(np.int64)
    mesh = trimesh.Trimesh(verts, faces, process=False)
    if mesh.volume < 0:
        mesh = trimesh.Trimesh(verts, faces[:, ::-1].copy(), process=False)
    return mesh


def _superellipse(n: int, a: float, b: float, power: float = 4.0) -> np.ndarray:
    """``(n, 2)`` points of ``|u/a|^p + |v/b|^p = 1`` (a rounded rectangle for p ≈ 4), counter-clockwise."""
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    e = 2.0 / power
    return np.stack([a * np.sign(c) * np.abs(c) ** e, b * np.sign(s) * np.abs(s) ** e], -1)


def _resample(polyline: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points evenly spaced by arc length along a dense ``(P, 2)`` polyline, and the
    arc length (mm) of every input vertex."""
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(polyline, axis=0), axis=1))])
    s = np.linspace(0.0, arc[-1], n)
    return np.stack([np.interp(s, arc, polyline[:, 0]), np.interp(s, arc, polyline[:, 1])], -1), arc


def _femoral_path(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sagittal centreline of a condyle, anterior flange top → distal → posterior condyle top.

    Three tangent-continuous pieces: the straight flange, an elliptical anterior-distal bend
    and the posterior circle about ``FEMUR_CENTER``. Returns ``(n, 2)`` points and the arc
    length (0..1) where each piece ends (flange, bend).
    """
    cx, cy = FEMUR_CENTER
    r = FEMUR_RADIUS - FEMUR_THICKNESS / 2
    bottom_y = cy - r
    front_x, knee_y = -42.0 + FEMUR_THICKNESS / 2, 5.0
    flange = np.stack([np.linspace(-37.0, front_x, 16), np.linspace(35.0, knee_y, 16)], -1)
    psi = np.linspace(0.0, np.pi / 2, 48)[::-1]
    a, b = cx - front_x, knee_y - bottom_y
    bend = np.stack([cx - a * np.sin(psi), knee_y - b * np.cos(psi)], -1)
    phi = np.deg2rad(np.linspace(0.0, 115.0, 48))
    arc = np.stack([cx + r * np.sin(phi), cy - r * np.cos(phi)], -1)
    dense = np.concatenate([flange, bend[1:], arc[1:]])
    path, length = _resample(dense, n)
    ends = np.array([length[len(flange) - 1], length[len(flange) + len(bend) - 2]]) / length[-1]
    return path, ends


def femoral_component(path_points: int = 64, ring_points: int = 20) -> trimesh.Trimesh:
    """A posterior-stabilised femoral component: two J-shaped condyles joined anteriorly by a
    flange, a box (cam housing) between the condyles and two fixation pegs."""
    path, (flange_end, bend_end) = _femoral_path(path_points)
    tangent = np.gradient(path, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], -1)  # in-plane normal (x, y)
    s = np.linspace(0.0, 1.0, len(path))
    # Mediolateral extent along the path: a trapezoid flange (the two halves meet at z = 0)
    # that splits into two condyles distally.
    knots = [0.0, 0.8 * flange_end, flange_end + 0.3 * (bend_end - flange_end), bend_end, 1.0]
    half = np.interp(s, knots, [12.5, 18.0, 18.0, 13.5, 13.0])
    centre = np.interp(s, knots, [12.5, 18.0, 18.0, 22.5, 22.0])
    ring = _superellipse(ring_points, FEMUR_THICKNESS / 2, 1.0, power=4.0)  # (normal offset, unit z)
    parts = []
    for side in (-1.0, 1.0):
        xy = path[:, None, :] + ring[None, :, 0, None] * normal[:, None, :]
        z = side * centre[:, None] + ring[None, :, 1] * half[:, None]
        parts.append(_loft(np.concatenate([xy, z[..., None]], -1)))
    # Box housing between the condyles (closed on top), and a cam bar at its posterior end.
    box = trimesh.creation.box(extents=(24.0, 20.0, 17.0))
    box.apply_translation((2.0, -7.0, 0.0))
    parts.append(box)
    cam = trimesh.creation.cylinder(radius=4.5, height=17.0, sections=20)
    cam.apply_translation((14.0, -12.0, 0.0))
    parts.append(cam)
    for z in (-22.0, 22.0):
        peg = trimesh.creation.cylinder(radius=3.2, height=16.0, sections=16)
        peg.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, (1.0, 0.0, 0.0)))
        peg.apply_translation((-17.0, -8.0, z))
        parts.append(peg)
    return trimesh.util.concatenate(parts)


def _tray_outline(n: int) -> np.ndarray:
    """``(n, 2)`` kidney outline in the (x, z) plane: rounded plate, posterior (+x) notch."""
    xz = _superellipse(n, 24.5, 37.0, power=2.6)
    notch = 9.0 * np.exp(-((xz[:, 1] / 8.0) ** 2)) * np.clip(xz[:, 0] / 24.5, 0.0, 1.0) ** 2
    xz[:, 0] -= notch
    return xz


def tibial_component(ring_points: int = 96) -> trimesh.Trimesh:
    """A tibial tray (kidney-shaped plate, top at y = 3) with a keel (stem and fins) below it."""
    outline = _tray_outline(ring_points)
    sections = []
    for y, inset in ((-2.0, 0.7), (-1.3, 0.0), (2.3, 0.0), (3.0, 0.7)):
        scale = 1.0 - inset / 24.5
        sections.append(np.stack([outline[:, 0] * scale, np.full(ring_points, y), outline[:, 1] * scale], -1))
    parts = [_loft(np.stack(sections))]
    # Central stem: tapered, rounded at the tip (y = -29.7).
    ys = np.array([-1.0, -6.0, -12.0, -18.0, -23.0, -26.5, -28.3, -29.3, -29.7])
    radius = np.array([7.5, 6.8, 6.2, 5.8, 5.5, 5.0, 4.0, 2.6, 0.8])
    circle = _superellipse(24, 1.0, 1.0, power=2.0)
    stem = [
        np.stack([-3.0 + r * circle[:, 0], np.full(24, y), r * circle[:, 1]], -1)
        for y, r in zip(ys, radius, strict=True)
    ]
    parts.append(_loft(np.stack(stem)))
    # Fins: a thin plate, wide under the tray, narrowing down the stem.
    ys = np.linspace(-1.0, -21.0, 9)
    half_z = 7.0 + 14.0 * ((ys + 21.0) / 20.0) ** 2
    slab = _superellipse(20, 1.0, 1.0, power=6.0)
    fins = [
        np.stack([-3.0 + 1.8 * slab[:, 0], np.full(20, y), h * slab[:, 1]], -1)
        for y, h in zip(ys, half_z, strict=True)
    ]
    parts.append(_loft(np.stack(fins)))
    return trimesh.util.concatenate(parts)


def procedural_models() -> dict[str, trimesh.Trimesh]:
    """The built-in implants by part name: ``{"fem": femoral_component(), "tib": tibial_component()}``."""
    return {"fem": femoral_component(), "tib": tibial_component()}
