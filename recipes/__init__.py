"""Recipes: complete runs selected with `+recipe=NAME` (see trainer/recipes.py)."""
