"""cupscale-dist: C-Upscale (global-regional priors) as a Ray-distributed multi-GPU tile orchestrator."""

from .config import UpscaleConfig
from .errors import UserError
from .pipeline import upscale

__all__ = ["UpscaleConfig", "UserError", "upscale"]
__version__ = "0.1.0"
