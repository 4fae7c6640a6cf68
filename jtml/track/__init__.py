"""Tracking whole sequences (``jtml track``): segmentation → pose network → registration for every
frame, each frame also started from the previous one's result, through Lightning's predict loop,
resumable after a kill, ending in pose files, a per-frame report, masks and knee kinematics.

- :mod:`jtml.track.data`: the studies as predict items, every input checked up front;
- :mod:`jtml.track.module`: :class:`TrackModule`, whose ``predict_step`` tracks one study;
- :mod:`jtml.track.journal`: the finished frames of an unfinished study (``OUT/.partial``);
- :mod:`jtml.track.writer`: :class:`TrackWriter`, a study's outputs, all at once;
- :mod:`jtml.track.settings`: registration stages and settings; :mod:`jtml.track.smoothing`: SE(3)
  smoothing.

It composes the layers below it (networks, registration, kinematics, the prediction writers' mask
geometry and the checkpoint readers of :mod:`jtml.deploy`), so it sits above them, below the CLI.
"""

from jtml.track.data import TrackDataModule
from jtml.track.module import TrackModule
from jtml.track.settings import FAST_STAGES, TrackSettings, load_stages
from jtml.track.smoothing import smooth_poses
from jtml.track.writer import TrackWriter

__all__ = [
    "FAST_STAGES",
    "TrackDataModule",
    "TrackModule",
    "TrackSettings",
    "TrackWriter",
    "load_stages",
    "smooth_poses",
]
