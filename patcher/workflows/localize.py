"""`patcher localize`: where a recipe's toxic and neutral text differ in a model (the scores are
`patcher.collect.localisation`; this wires the model, the data and the collector to it)."""

from __future__ import annotations

from ..collect.collector import Collector
from ..collect.localisation import Localisation, localize
from ..collect.parallel import ParallelCollect
from ..core.placement import Placement
from ..data.loaders import load_data
from ..io.model_files import resolve_model
from ..recipe.loader import Recipe


def localize_recipe(recipe: Recipe, *, placement: Placement | None = None) -> Localisation:
    """Localisation on a recipe's model and data. The data and ``paired`` come from the recipe's first
    step that has them (else ``[data]``, unpaired); earlier steps are not applied. ``placement``:
    the model whole, over a device map, or layer by layer (``--sequential``)."""
    spec = recipe.model.id
    folder, _ = resolve_model(spec, recipe.model.revision, recipe.model.trust_remote_code)
    pipeline = ParallelCollect((placement or Placement()).replace(checkpoint_every=0, resume=False))
    model, tok = pipeline.load(folder, recipe.model.dtype, pipeline.placement.device, recipe.model.trust_remote_code)
    data_settings = recipe.data
    paired = False
    for step in recipe.steps:
        if "paired" in step.settings:
            paired = bool(step.settings["paired"])
            data_settings = step.data or recipe.data
            break
    data = load_data(data_settings, tok)
    c = recipe.collect
    collector = Collector(model, tok, batch_size=c.batch_size, max_tokens=data_settings.max_tokens,
                          padding_side=c.padding_side, skip_first=c.skip_first, options=pipeline)
    loc = localize(model, collector, data, paired=paired)
    loc.meta = {"model": str(spec), "recipe": str(recipe.path), "data": str(data_settings.path)}
    return loc
