"""Hydra config tree (package data, so `train` finds it from a wheel as well)."""
