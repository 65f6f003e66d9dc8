"""The proxy a trial is scored with, and the statistics cache that makes a trial cheap.

Damage is the recipe's check perplexity; toxicity is the mean log-likelihood margin of toxic texts
over non-toxic ones (`patcher.evaluate.likelihood`) on texts of the proxy data that none of the
recipe's steps uses. A trial's patch is attached through its hook face (no bake), its statistics come
from `StatsCache` (collected once per distinct set of collection-relevant settings).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.errors import PatcherError
from ...data.loaders import load_data
from ...edits.patch import Patch
from ...evaluate.likelihood import likelihood_margin
from ...recipe.loader import DataSettings, Recipe
from ..run import check_perplexity, compute_patch
from ..run_plan import Plan, resolve
from .space import Param, TuneSettings, apply, layer_spans, with_choice_data


class StatsCache(OrderedDict):
    """The statistics cache of `compute_patch`, keeping the ``size`` most recently used entries: a
    later step's statistics change with an earlier step's strength (a grid value each), and would
    otherwise pile up over a long study. ``collections`` counts the misses."""

    def __init__(self, size: int = 24) -> None:
        super().__init__()
        self.size = size
        self.collections = 0

    def __getitem__(self, key: Any) -> Any:
        self.move_to_end(key)
        return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.collections += 1
        super().__setitem__(key, value)
        while len(self) > self.size:
            self.popitem(last=False)


@dataclass
class Scorer:
    """Everything a trial needs, loaded once: the plan, the model, the check slice, the proxy's
    held-back texts. ``recipe``: the run's `Plan` (a Recipe is resolved)."""

    recipe: Any
    params: list[Param]
    model: Any
    tokenizer: Any
    ppl_ids: Any
    held_back: tuple[list[str], list[str]]  # the proxy's toxic and non-toxic texts
    cache: StatsCache = field(default_factory=StatsCache)
    patches: dict[int, Patch] = field(default_factory=dict)
    plan: Plan = field(init=False)

    def __post_init__(self) -> None:
        self.plan = with_choice_data(self.recipe if isinstance(self.recipe, Plan) else resolve(self.recipe), self.params)
        self.recipe = self.plan.recipe

    def measure(self, model: Any) -> tuple[float, float]:
        ppl = check_perplexity(model, self.tokenizer, self.recipe, self.ppl_ids)
        return ppl, likelihood_margin(model, self.tokenizer, *self.held_back, max_tokens=self.recipe.data.max_tokens,
                                      batch_size=self.recipe.collect.batch_size)

    def patch(self, values: dict[str, Any]) -> Patch:
        patch, _ = compute_patch(apply(self.plan, self.params, values), self.model, self.tokenizer,
                                 stats_cache=self.cache, collect_as=layer_spans(self.params))
        return patch

    def score(self, values: dict[str, Any]) -> tuple[Patch, float, float]:
        patch = self.patch(values)
        with patch.hooked(self.model) as hooked:
            ppl, margin = self.measure(hooked)
        return patch, ppl, margin


def proxy_data(recipe: Recipe, settings: TuneSettings) -> DataSettings:
    """The data the toxicity proxy holds texts back from: ``[tune.proxy]``, else the recipe's last
    unpaired data, else its last paired data. Unpaired labelled text (e.g. Jigsaw comments) samples
    toxicity as it occurs, the broad notion the evaluators score; paraphrase pairs isolate wording
    and, in a stack, rank a later step's broader edit too low (README, "Proxy vs real evaluation")."""
    if settings.proxy is not None:
        return settings.proxy
    datas = [s.data or recipe.data for s in recipe.steps]
    return ([d for d in datas if not d.pairs] or datas)[-1]


def proxy_name(spec: DataSettings) -> str:
    """The proxy data as a report names it: the catalog name, else the file's name (never a path)."""
    return spec.dataset if not spec.path else Path(spec.path).name


def held_back(plan: Plan | Recipe, settings: TuneSettings, tokenizer: Any) -> tuple[list[str], list[str]]:
    """``proxy_n`` toxic and ``proxy_n`` non-toxic texts of the proxy data that no step of the recipe
    uses (pairs kept whole, in order). The plan's data are read from their resolved files."""
    plan = plan if isinstance(plan, Plan) else resolve(plan)
    spec = proxy_data(plan.recipe, settings)
    datas = list(plan.data)
    used = {t for d in datas for t in load_data(plan.readable(d), tokenizer).texts}
    # A sample this large holds proxy_n texts of each class the steps' samples do not.
    wide = dataclasses.replace(spec, n_per_class=settings.proxy_n + sum(d.n_per_class for d in datas))
    pool = load_data(dataclasses.replace(wide, path=plan.data[spec].path) if spec in plan.data else wide, tokenizer)
    if spec.pairs:
        pairs = [(pool.texts[i], pool.texts[i + 1]) for i in range(0, len(pool.texts), 2)
                 if pool.texts[i] not in used and pool.texts[i + 1] not in used][: settings.proxy_n]
        toxic, neutral = [t for t, _ in pairs], [n for _, n in pairs]
    else:
        toxic = [t for t, y in zip(pool.texts, pool.labels) if y == 1 and t not in used][: settings.proxy_n]
        neutral = [t for t, y in zip(pool.texts, pool.labels) if y == 0 and t not in used][: settings.proxy_n]
    if min(len(toxic), len(neutral)) < settings.proxy_n:
        raise PatcherError(f"{pool.source}: only {min(len(toxic), len(neutral))} texts of a class are left for the toxicity proxy after the ones "
                           f"the recipe uses; lower tune.proxy_n (now {settings.proxy_n}) or name more data in [tune.proxy]")
    return toxic, neutral

