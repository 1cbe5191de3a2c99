"""The files lcsm ships (lcsm/recipes/: models/ the zoo, tasks/, train/, ablations/) and the one
resolver of names and paths: wherever a spec, task, recipe or ablation is expected, a file path
or the name of a shipped file is accepted."""

from __future__ import annotations

from pathlib import Path

from lcsm.config.base import RecipeError, SpecError

QUICKSTART = "quickstart"  # the recipe `lcsm train` runs without arguments


def recipes_dir() -> Path:
    """The shipped YAML, inside the installed package."""
    return Path(__file__).resolve().parent.parent / "recipes"


def shipped(folder: str) -> dict[str, Path]:
    """name -> path of every shipped YAML file in recipes/FOLDER, sorted by name."""
    return {p.stem: p for p in sorted((recipes_dir() / folder).glob("*.yaml"))}


def shipped_recipes(folder: str = "train") -> dict[str, Path]:
    return shipped(folder)


def zoo_paths() -> dict[str, Path]:
    """name -> path of every shipped model spec, sorted by name."""
    return shipped("models")


def zoo_names() -> list[str]:
    return list(zoo_paths())


def zoo_path(name: str) -> Path | None:
    return zoo_paths().get(name)


def _looks_like_path(path: Path) -> bool:
    # is_file, not exists: a folder named like a zoo model (./lcsm in a checkout) is not a spec
    return path.is_file() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1


def resolve_spec_path(spec: str | Path) -> Path:
    """A file path, or the name of a shipped zoo spec ('gla' -> recipes/models/gla.yaml)."""
    path = Path(spec)
    if _looks_like_path(path):
        return path
    found = zoo_path(str(spec))
    if found is None:
        raise SpecError(f"{spec}: no such file, and not a zoo model (zoo: {', '.join(zoo_names())})")
    return found


def resolve_shipped_path(recipe: str | Path, folder: str = "train", what: str = "recipe") -> Path:
    """A YAML file, or the name of a shipped one (recipes/FOLDER/NAME.yaml)."""
    path = Path(recipe)
    if _looks_like_path(path):
        return path
    found = shipped(folder).get(str(recipe))
    if found is None:
        raise RecipeError(f"{recipe}: no such file, and not a shipped {what} ({', '.join(shipped(folder))})")
    return found


def resolve_recipe_path(recipe: str | Path | None) -> Path:
    """A recipe file, or the name of a shipped one (recipes/train/NAME.yaml); None: the quick start."""
    return shipped("train")[QUICKSTART] if recipe is None else resolve_shipped_path(recipe)


def find_file(value: str, base: Path | None) -> Path:
    """A relative path as written in a recipe: from the current directory, else from the recipe's folder."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or base is None:
        return path
    beside = base / path
    return beside if beside.exists() else path
