"""mimkit: masked image modelling with mean teachers (MAE, RC-MAE, SdAE)."""

__version__ = "0.1.0"

from mimkit.errors import MimkitError

__all__ = ["MimkitError", "__version__"]
