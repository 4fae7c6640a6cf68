"""jtml: Lightning experiments for fluoroscopic TKR implant tracking."""

__version__ = "0.1.0"
