"""Simulation: procedural implant models and synthetic studies with exact labels and poses."""
