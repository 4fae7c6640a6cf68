"""Camera, pose and projection conventions of JointTrack, silhouette rendering, regions of interest
and knee-pose sampling."""

from jtml.geometry.camera import Camera, camera_vector
from jtml.geometry.render import SilhouetteRenderer, project_mesh, rasterize_triangles, render_silhouette
from jtml.geometry.rotations import (
    euler312_to_matrix,
    geodesic_angle,
    matrix_to_euler312,
    matrix_to_pose,
    matrix_to_rot6d,
    pose_to_matrix,
    rot6d_to_matrix,
    symmetric_twin,
    wrap_degrees,
)

__all__ = [
    "Camera",
    "SilhouetteRenderer",
    "camera_vector",
    "euler312_to_matrix",
    "geodesic_angle",
    "matrix_to_euler312",
    "matrix_to_pose",
    "matrix_to_rot6d",
    "pose_to_matrix",
    "project_mesh",
    "rasterize_triangles",
    "render_silhouette",
    "rot6d_to_matrix",
    "symmetric_twin",
    "wrap_degrees",
]
