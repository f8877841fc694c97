"""`cupscale`: the command line (``main``); ``python -m cupscale_dist.cli`` runs it too."""

from .main import main

__all__ = ["main"]
