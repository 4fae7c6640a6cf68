"""Knee kinematics from femur and tibia poses, on numpy arrays (usable from a notebook).

::

    from jtml import kinematics as kin
    from jtml.io import read_poses, read_stl

    fem, tib = read_poses("fem.jts", allow_missing=True), read_poses("tib.jts", allow_missing=True)
    k = kin.knee_kinematics(fem, tib, side="right", fem_model=read_stl("fem.stl"))
    k[kin.FLEXION]                       # (N,) degrees, + = flexion; NaN where a pose is missing
    kin.write_report("out/", k)          # out/kinematics.csv + PNG plots, staged
    print(kin.summary(k))

Poses are JointTrack rows ``(x, y, z, z_rot, x_rot, y_rot)`` (``R = Rz·Rx·Ry``) or 4×4
model-to-camera transforms. Each column's name carries its sign convention
(``flexion_deg(+flex)``). Conventions and their sources: :mod:`jtml.kinematics.joint`;
anatomical axes files (a 4×4 STL → anatomical frame per implant): :mod:`jtml.kinematics.axes`.
"""

from jtml.kinematics.axes import check_rigid, read_axes, write_axes
from jtml.kinematics.joint import (
    ABDUCTION,
    COLUMNS,
    CONDYLE_COLUMNS,
    FEMUR_AP,
    FEMUR_ML,
    FEMUR_SI,
    FLEXION,
    GAP_COLUMNS,
    GS_ABDUCTION,
    GS_AP,
    GS_COLUMNS,
    GS_FLEXION,
    GS_INTERNAL,
    GS_ML,
    GS_SI,
    INTERNAL,
    LAB_COLUMNS,
    SIDES,
    anatomical_poses,
    as_matrices,
    check_side,
    condyle_lowest_points,
    grood_suntay,
    knee_kinematics,
    lab_kinematics,
    relative_pose,
)
from jtml.kinematics.report import (
    CSV_NAME,
    PLOT_NAMES,
    log_kinematics,
    summary,
    write_csv,
    write_plots,
    write_report,
)

__all__ = [
    "ABDUCTION",
    "COLUMNS",
    "CONDYLE_COLUMNS",
    "CSV_NAME",
    "FEMUR_AP",
    "FEMUR_ML",
    "FEMUR_SI",
    "FLEXION",
    "GAP_COLUMNS",
    "GS_ABDUCTION",
    "GS_AP",
    "GS_COLUMNS",
    "GS_FLEXION",
    "GS_INTERNAL",
    "GS_ML",
    "GS_SI",
    "INTERNAL",
    "LAB_COLUMNS",
    "PLOT_NAMES",
    "SIDES",
    "anatomical_poses",
    "as_matrices",
    "check_rigid",
    "check_side",
    "condyle_lowest_points",
    "grood_suntay",
    "knee_kinematics",
    "lab_kinematics",
    "log_kinematics",
    "read_axes",
    "relative_pose",
    "summary",
    "write_axes",
    "write_csv",
    "write_plots",
    "write_report",
]
