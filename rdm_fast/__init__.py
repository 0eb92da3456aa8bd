"""rdm_fast: fast, faithful Retrieval-Augmented Diffusion Models (arXiv 2204.11824)."""

import pkgutil

# Imported from a source checkout (e.g. `python -m rdm_fast.sample` in the repository root), this package has
# no compiled extension or Triton kernels beside it: also search the installed copy for them.
__path__ = pkgutil.extend_path(__path__, __name__)

__version__ = "0.1.0"

from .config import ConfigError, RDMConfig  # noqa: E402
from .rdm import RDM  # noqa: E402

__all__ = ["RDM", "RDMConfig", "ConfigError", "__version__"]
