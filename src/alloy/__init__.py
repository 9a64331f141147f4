"""alloy: combine and adapt foundation-model checkpoints.

Plain Hugging Face checkpoints in and out; see `alloy --help` for the command line.
"""

from alloy.errors import AlloyError

__version__ = "0.1.0"

__all__ = ["AlloyError", "__version__"]
