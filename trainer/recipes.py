"""Recipes: complete runs selected with `+recipe=NAME`.

Every `*.yaml` in the package's `recipes/` folder is registered as an option of the `recipe`
group (package `_global_`: a recipe overrides keys anywhere in the tree). A user adds a recipe by
dropping a file there, or by putting `recipe/NAME.yaml` in a directory on Hydra's search path
(`hydra.searchpath=[file:///my/configs]`).
"""

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def register_recipes() -> None:
    store = ConfigStore.instance()
    for name in recipe_names():
        store.store(group="recipe", name=name, node=OmegaConf.load(RECIPES_DIR / f"{name}.yaml"), package="_global_")
