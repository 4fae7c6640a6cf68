"""Lightning callbacks: W&B images, prediction writers on one base, and machine settings."""

from jtml.callbacks.images import WandbSegmentationImages
from jtml.callbacks.pose import PosePredictionWriter
from jtml.callbacks.predict import PredictionFolderWriter, SegmentationPredictionWriter
from jtml.callbacks.system import CPUThreads

__all__ = [
    "CPUThreads",
    "PosePredictionWriter",
    "PredictionFolderWriter",
    "SegmentationPredictionWriter",
    "WandbSegmentationImages",
]
