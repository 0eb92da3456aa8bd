"""rdm_fast: fast, faithful Retrieval-Augmented Diffusion Models (arXiv 2204.11824)."""

import os
import pkgutil

# Imported from a source checkout (e.g. `python -m rdm_fast.sample` in the repository root), this package has
# no compiled extension beside it: also search the installed copy for it. The Triton kernels live in the
# checkout's top-level `kernels/` (installed as rdm_fast.kernels): search the checkout root first for them, so
# edits to kernels take effect without reinstalling.
__path__ = pkgutil.extend_path(__path__, __name__)
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_checkout, "kernels", "__init__.py")) and _checkout not in __path__:
    __path__.insert(1, _checkout)

__version__ = "0.2.0"

from .config import ConfigError, RDMConfig  # noqa: E402
from .rdm import RDM  # noqa: E402

__all__ = ["RDM", "RDMConfig", "ConfigError", "__version__"]
