"""LightningModules: segmentation and pose networks."""
