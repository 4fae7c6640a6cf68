"""torchmetrics Metrics for segmentation and pose."""
