"""Recipes in the UI: the gallery's captions, a dropped PNG's recipe read back, and a recipe put back into
the Image tab's fields (what "read the recipe" fills in)."""

from __future__ import annotations

from pathlib import Path

# The Image tab fields a recipe fills, in this order (recipe key, the field's "model default" value).
RECIPE_FIELDS = (("prompt", ""), ("negative_prompt", ""), ("steps", 0), ("cfg_scale", 0.0), ("seed", 0),
                 ("width", 0), ("height", 0), ("sampler", ""), ("scheduler", ""))


def caption(recipe: dict) -> str:
    """A gallery caption: the A1111 infotext (what image sites show)."""
    from diffstudio.io.recipe import a1111_parameters

    return a1111_parameters(recipe)


def gallery_items(outputs: Path, names: list[str], recipes: list[dict]) -> list[tuple[str, str]]:
    """(file path, caption) for each output of a job."""
    return [(str(outputs / name), caption(recipe)) for name, recipe in zip(names, recipes)]


def read_file_recipe(path: str | Path | None) -> dict:
    """The recipe stored in an image file (diffstudio's JSON, else A1111's parameters); {} without a file."""
    from diffstudio.io.recipe import read_recipe

    return {} if path is None else read_recipe(path)


def form_values(recipe: dict) -> list:
    """The values of ``RECIPE_FIELDS`` from a recipe; a key the recipe lacks gets the field's default."""
    return [recipe.get(key) if recipe.get(key) is not None else default for key, default in RECIPE_FIELDS]
