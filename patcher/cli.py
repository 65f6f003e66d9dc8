"""The `patcher` command line. Every command is a thin shell over the Python API; a PatcherError
becomes one line on stderr and exit status 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .errors import PatcherError
from .table import render


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a PatcherError into a one-line message and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PatcherError as exc:
            click.echo(f"patcher: error: {exc}", err=True)
            sys.exit(2)

    return wrapper


LAYER_HEADERS = ["layer", "edits", "units changed", "units", "mean factor", "proj rank"]


@click.group()
def main() -> None:
    """Detoxify causal language models by baking weight edits into plain safetensors checkpoints."""


@main.command()
@click.argument("patch_path", metavar="PATCH", type=click.Path(path_type=Path))
@click.option("--model", "-m", required=True, help="Base model: local folder, Hub id, or smollm2-135m.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder (only once the new one is complete).")
@click.option("--untie", is_flag=True, help="Allow edits on tied embeddings by writing a separate lm_head.weight.")
@friendly
def bake(patch_path: Path, model: str, out: Path, overwrite: bool, untie: bool) -> None:
    """Bake PATCH into MODEL and write the result to OUT."""
    from .bake import bake as run_bake
    from .patch import Patch

    result = run_bake(Patch.load(patch_path), model, out, overwrite=overwrite, untie=untie)
    click.echo(f"wrote {result}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@friendly
def inspect(path: Path) -> None:
    """Show the edits of a patch or a baked output folder, per layer and tensor."""
    from .patch import Patch

    patch = Patch.load(path)
    rows = [[e.module, e.kind, e.summary()] for e in patch.edits]
    click.echo(render(["module", "edit", "summary"], rows, title=f"{len(patch.edits)} edits in {path}"))
    click.echo()
    click.echo(render(LAYER_HEADERS, patch.per_layer(), title="per layer"))


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--no-logits", is_flag=True, help="Skip the logits comparison (files and tensors only).")
@friendly
def verify(out: Path, no_logits: bool) -> None:
    """Check that OUT is exactly its recorded base model plus its patch."""
    from .verify import verify as run_verify

    r = run_verify(out, logits=not no_logits)
    click.echo(f"files: {'ok' if not r.bad_files else 'MISMATCH ' + ', '.join(r.bad_files)}")
    click.echo(f"tensors: {'ok' if not r.bad_tensors else 'MISMATCH ' + ', '.join(r.bad_tensors[:10])}")
    if not no_logits:
        click.echo(f"logits: max abs diff {r.max_abs_diff:.3g} (tolerance {r.tolerance:.3g})")
    click.echo("verify: OK" if r.ok else "verify: FAILED")
    sys.exit(0 if r.ok else 1)


_recipe_arg = click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))
_model_opt = click.option("--model", "-m", default=None, help="Model: local folder, Hub id, or smollm2-135m (default: the recipe's).")
_device_opt = click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
_batch_opt = click.option("--batch-size", type=int, default=None, help="Collection batch size (default: the recipe's).")


@main.command()
@_recipe_arg
@_model_opt
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None, help="Output folder (default runs/RECIPE-MODEL).")
@_device_opt
@_batch_opt
@click.option("--force", is_flag=True, help="Publish even when perplexity rises beyond the recipe's budget.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder once the new one is ready.")
@friendly
def run(recipe_path: Path, model: str | None, out: Path | None, device: str, batch_size: int | None, force: bool, overwrite: bool) -> None:
    """Compute RECIPE's edits on a model, bake them, check perplexity, and write the output folder."""
    from .recipe import load_recipe
    from .run import run as run_recipe

    r = run_recipe(load_recipe(recipe_path), model_spec=model, out=out, device=device, batch_size=batch_size, force=force, overwrite=overwrite)
    for d in r.data:
        s = d["data"]
        click.echo(f"step {d['step']} ({d['method']}) data: {s}")
    click.echo(render(LAYER_HEADERS, r.patch.per_layer(), title="edits per layer"))
    click.echo()
    click.echo(render(["stage", "seconds"], [[k, round(v, 2)] for k, v in r.timings.seconds.items()] + [["total", round(sum(r.timings.seconds.values()), 2)]]))
    click.echo(f"perplexity {r.ppl_before:.2f} -> {r.ppl_after:.2f} ({r.ppl_increase:+.1%})")
    click.echo(f"wrote {r.out}")


@main.command()
@_recipe_arg
@_model_opt
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Folder for patch.json + patch.safetensors.")
@_device_opt
@_batch_opt
@click.option("--overwrite", is_flag=True, help="Replace an existing patch folder.")
@friendly
def compute(recipe_path: Path, model: str | None, out: Path, device: str, batch_size: int | None, overwrite: bool) -> None:
    """Compute RECIPE's patch without baking it (bake later with `patcher bake`)."""
    from .checkpoint import atomic_folder, resolve_model
    from .recipe import load_recipe
    from .run import compute_patch, load_model

    recipe = load_recipe(recipe_path)
    if out.exists() and not overwrite:
        raise PatcherError(f"output folder {out} already exists: choose another --out or pass --overwrite")
    folder, _ = resolve_model(model or recipe.model.id, recipe.model.revision)
    m, tok = load_model(folder, recipe.model.dtype, device, recipe.model.trust_remote_code)
    patch, _ = compute_patch(recipe, m, tok, batch_size=batch_size)
    with atomic_folder(out) as tmp:
        patch.save(tmp)
    click.echo(render(LAYER_HEADERS, patch.per_layer(), title="edits per layer"))
    click.echo(f"wrote {out}")


@main.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--model", "-m", default=None, help="Model: local folder, Hub id, or smollm2-135m (default: the recipe's).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write every score to this JSON file.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Write a heat map (PNG) of the scores.")
@click.option("--top", type=int, default=10, show_default=True, help="How many layers the table shows.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--batch-size", type=int, default=None, help="Collection batch size (default: the recipe's).")
@friendly
def localize(recipe_path: Path, model: str | None, json_path: Path | None, plot_path: Path | None, top: int, device: str, batch_size: int | None) -> None:
    """Where toxic and neutral text differ: effect size per layer and block (attn_out, mlp_out), and
    per MLP neuron, on RECIPE's data (paired when its step says paired = true)."""
    from .localize import localize_recipe
    from .recipe import load_recipe

    loc = localize_recipe(load_recipe(recipe_path), model_spec=model, device=device, batch_size=batch_size)
    n = ", ".join(f"{k} {v}" for k, v in loc.n.items())
    title = f"top {top} layers by effect size (cross-fitted Cohen's d along the toxic-minus-neutral mean difference; {n})"
    click.echo(render(loc.headers(), loc.table_rows(top), title=title))
    if json_path:
        click.echo(f"wrote {loc.save_json(json_path)}")
    if plot_path:
        click.echo(f"wrote {loc.plot(plot_path)}")
