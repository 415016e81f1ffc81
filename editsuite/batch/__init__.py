"""Batch edits: a recipe (`tasks/*.toml`) run over many inputs, resumable and journaled.

    from editsuite.batch import Batch, load_recipe

    for result in Batch(load_recipe("tasks/inpaint-shapes.toml")).run():
        print(result.key, result.status, result.output)

    Batch(recipe, engine="ray")      # the same, on a pool of Ray workers (pip install "editsuite[ray]")
"""

from editsuite.batch.recipe import Item, Recipe, load_recipe
from editsuite.batch.runner import Batch, ItemResult

__all__ = ["Batch", "Item", "ItemResult", "Recipe", "load_recipe"]
