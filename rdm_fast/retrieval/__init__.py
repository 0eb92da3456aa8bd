"""Retrieval: embedding databases on disk, building and importing them, nearest-neighbour search and the
training-neighbour / top-m proposal lists."""

from .build import build_database
from .context import model_context
from .database import Database, add_index, read_manifest, save_proposals, write_database
from .neighbors import compute_neighbors, proposal_ranking, save_neighbors
from .npz_import import import_npz
from .gpu_search import GPUExactSearch
from .search import exact_search

__all__ = ["Database", "GPUExactSearch", "add_index", "build_database", "compute_neighbors", "exact_search",
           "import_npz", "model_context", "proposal_ranking", "read_manifest", "save_neighbors",
           "save_proposals", "write_database"]
