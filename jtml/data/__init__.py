"""Indexes, datasets, datamodules, transforms and synthetic studies."""
