"""Lightning Strategy plugins and the distributed pieces they use: mesh, gradient sync, token dispatch."""

from .mesh_strategy import MeshStrategy

__all__ = ["MeshStrategy"]
