"""rdm_fast: fast, faithful Retrieval-Augmented Diffusion Models (arXiv 2204.11824)."""

__version__ = "0.1.0"

from .config import ConfigError, RDMConfig  # noqa: E402
from .rdm import RDM  # noqa: E402

__all__ = ["RDM", "RDMConfig", "ConfigError", "__version__"]
