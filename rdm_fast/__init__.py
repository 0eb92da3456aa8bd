"""rdm_fast: fast, faithful Retrieval-Augmented Diffusion Models (arXiv 2204.11824)."""

import os
import pkgutil


def _source_checkout(package_dir: str) -> str | None:
    """The source checkout holding ``package_dir`` (its parent, with setup.py, CMakeLists.txt, kernels/ and
    csrc/ of rdm_fast), or None for an installed copy: its parent is site-packages, where another distribution
    may have put a `kernels` or `csrc` of its own."""
    root = os.path.dirname(package_dir)
    marks = ("setup.py", "CMakeLists.txt", os.path.join("kernels", "__init__.py"), os.path.join("csrc", "library.cpp"))
    return root if all(os.path.isfile(os.path.join(root, mark)) for mark in marks) else None


# Imported from a source checkout (e.g. `python -m rdm_fast.sample` in the repository root), this package has
# no compiled extension beside it: also search the installed copy for it. The Triton kernels live in the
# checkout's top-level `kernels/` (installed as rdm_fast.kernels): search the checkout root first for them, so
# edits to kernels take effect without reinstalling.
SOURCE_CHECKOUT = _source_checkout(os.path.dirname(os.path.abspath(__file__)))
__path__ = pkgutil.extend_path(__path__, __name__)
if SOURCE_CHECKOUT is not None and SOURCE_CHECKOUT not in __path__:
    __path__.insert(1, SOURCE_CHECKOUT)

__version__ = "0.2.0"

from .config import ConfigError, RDMConfig  # noqa: E402
from .rdm import RDM  # noqa: E402

__all__ = ["RDM", "RDMConfig", "ConfigError", "__version__"]
