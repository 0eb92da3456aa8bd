"""Retrieval: embedding files and exact nearest-neighbour search."""

from .embeddings import load_embeddings
from .search import exact_search

__all__ = ["load_embeddings", "exact_search"]
