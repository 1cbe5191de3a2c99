"""The shipped model specs (recipes/models/*.yaml, installed as lcsm.recipes)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def recipes_dir() -> Path:
    return Path(str(resources.files("lcsm.recipes")))


def zoo_paths() -> dict[str, Path]:
    """name -> path of every shipped model spec, sorted by name."""
    return {p.stem: p for p in sorted((recipes_dir() / "models").glob("*.yaml"))}


def zoo_names() -> list[str]:
    return list(zoo_paths())


def zoo_path(name: str) -> Path | None:
    return zoo_paths().get(name)
