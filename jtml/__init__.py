"""jtml: Lightning experiments for fluoroscopic TKR implant tracking."""

from jtml import _moved

__version__ = "0.1.0"

_moved.install()  # module paths of the first layout still import (old YAMLs, runs, checkpoints)
