"""Lightning Strategy plugins and the distributed pieces they use: mesh, gradient sync, token dispatch."""

__all__ = ["MeshStrategy"]


def __getattr__(name):
    # Lazy: `import paratrain.strategies.mesh` (the CLI's validation, spawned test ranks) should
    # not pay for importing Lightning.
    if name == "MeshStrategy":
        from .mesh_strategy import MeshStrategy

        return MeshStrategy
    raise AttributeError(name)
