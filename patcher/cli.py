"""The `patcher` command line. Every command is a thin shell over the Python API; a PatcherError
becomes one line on stderr and exit status 2."""

from __future__ import annotations

import functools
import json
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
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="PNG map of the heads and neurons a circuit patch removes.")
@friendly
def inspect(path: Path, plot: Path | None) -> None:
    """Show the edits of a patch or a baked output folder, per layer and tensor."""
    from .methods.circuit import SUMMARY_HEADERS, Circuit, plot_circuit
    from .patch import Patch

    patch = Patch.load(path)
    rows = [[e.module, e.kind, e.summary()] for e in patch.edits]
    click.echo(render(["module", "edit", "summary"], rows, title=f"{len(patch.edits)} edits in {path}"))
    click.echo()
    click.echo(render(LAYER_HEADERS, patch.per_layer(), title="per layer"))
    circuit = Circuit.from_patch(patch)
    if circuit.n_heads or circuit.n_neurons:
        click.echo()
        click.echo(render(SUMMARY_HEADERS, circuit.summary_rows(), title=f"circuit: {circuit.n_heads} heads, {circuit.n_neurons} neurons removed"))
        if plot:
            config_path = path / "config.json" if path.is_dir() else None  # an output folder knows its head count
            config = json.loads(config_path.read_text()) if config_path and config_path.is_file() else None
            plot_circuit(circuit, config, plot)
            click.echo(f"wrote {plot}")
    elif plot:
        raise PatcherError(f"{path} removes no heads or neurons: --plot maps circuit patches only")


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


def _set_data_dir(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    from .catalog import set_data_dir

    set_data_dir(value)  # None too: a command without --data-dir falls back to $PATCHER_DATA


_data_dir_opt = click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None, expose_value=False,
                             callback=_set_data_dir, help="Local folder with the catalog's data sets (default: $PATCHER_DATA; else the Hub).")


def _scale_opts(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options for models beyond one device and runs beyond one process (docs/scaling.md)."""
    for opt in reversed([
        click.option("--device-map", default=None, help="Place the model with accelerate: auto, balanced, sequential, or one device (GPUs, then CPU, then disk)."),
        click.option("--max-memory", default=None, help="Per-device budget for --device-map, e.g. 0=70GiB,1=70GiB,cpu=100GiB."),
        click.option("--sequential", is_flag=True, help="Collect layer by layer: memory is one layer plus the calibration set's hidden states."),
        click.option("--hidden-max-gib", type=float, default=8.0, show_default=True, help="With --sequential: hidden states above this size go to a temporary file."),
        click.option("--resume", is_flag=True, help="Continue a killed run from its checkpoints (OUT.collect-state/)."),
        click.option("--checkpoint-every", type=int, default=16, show_default=True, help="Checkpoint the statistics every N batches (0: never)."),
    ]):
        fn = opt(fn)
    return fn


def _scale(kw: dict[str, Any]) -> Any:
    from .distributed import ScaleOptions

    return ScaleOptions(sequential=kw.pop("sequential"), hidden_max_gib=kw.pop("hidden_max_gib"), device_map=kw.pop("device_map"),
                        max_memory=kw.pop("max_memory"), resume=kw.pop("resume"), checkpoint_every=kw.pop("checkpoint_every"))


@main.command()
@_recipe_arg
@_model_opt
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None, help="Output folder (default runs/RECIPE-MODEL).")
@_device_opt
@_batch_opt
@click.option("--force", is_flag=True, help="Publish even when perplexity rises beyond the recipe's budget.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder once the new one is ready.")
@click.option("--no-eval", is_flag=True, help="Skip the recipe's [eval] table (the model card is written without an evaluation).")
@_scale_opts
@_data_dir_opt
@friendly
def run(recipe_path: Path, model: str | None, out: Path | None, device: str, batch_size: int | None, force: bool, overwrite: bool, no_eval: bool,
        **scale: Any) -> None:
    """Compute RECIPE's edits on a model, bake them, check perplexity, evaluate against the base
    model when the recipe has an [eval] table, and write the output folder with its model card.
    Data-parallel: `torchrun --nproc_per_node N -m patcher.cli run ...` (rank 0 writes)."""
    from .recipe import load_recipe
    from .run import run as run_recipe

    recipe = load_recipe(recipe_path)
    r = run_recipe(recipe, model_spec=model, out=out, device=device, batch_size=batch_size, force=force, overwrite=overwrite, scale=_scale(scale),
                   run_eval=not no_eval)
    if r is None:  # a data-parallel rank other than 0: rank 0 reports
        return
    for d in r.data:
        s = d["data"]
        click.echo(f"step {d['step']} ({d['method']}) data: {s}")
    click.echo(render(LAYER_HEADERS, r.patch.per_layer(), title="edits per layer"))
    click.echo()
    click.echo(render(["stage", "seconds"], [[k, round(v, 2)] for k, v in r.timings.seconds.items()] + [["total", round(sum(r.timings.seconds.values()), 2)]]))
    click.echo(f"perplexity {r.ppl_before:.2f} -> {r.ppl_after:.2f} ({r.ppl_increase:+.1%})")
    if r.eval_report is not None:
        from .evaluate import report_table

        click.echo()
        click.echo(report_table(r.eval_report))
    click.echo(f"wrote {r.out}")


@main.command()
@_recipe_arg
@_model_opt
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Folder for patch.json + patch.safetensors.")
@_device_opt
@_batch_opt
@click.option("--overwrite", is_flag=True, help="Replace an existing patch folder.")
@_scale_opts
@_data_dir_opt
@friendly
def compute(recipe_path: Path, model: str | None, out: Path, device: str, batch_size: int | None, overwrite: bool, **scale_kw: Any) -> None:
    """Compute RECIPE's patch without baking it (bake later with `patcher bake`)."""
    from .checkpoint import atomic_folder, resolve_model
    from .recipe import load_recipe
    from .run import compute_patch

    recipe = load_recipe(recipe_path)
    if out.exists() and not overwrite:
        raise PatcherError(f"output folder {out} already exists: choose another --out or pass --overwrite")
    folder, _ = resolve_model(model or recipe.model.id, recipe.model.revision)
    scale = _scale(scale_kw)
    device = scale.prepare(folder, out, device)
    m, tok = scale.load(folder, recipe.model.dtype, device, recipe.model.trust_remote_code)
    patch, _ = compute_patch(recipe, m, tok, batch_size=batch_size, scale=scale)
    if not scale.world.is_main:
        return
    with atomic_folder(out) as tmp:
        patch.save(tmp)
    scale.finish()
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
@_data_dir_opt
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


@main.command("eval")
@click.argument("model")
@click.option("--baseline", "-b", default=None, help="Base model to compare with (same prompts, same seed): folder, Hub id or smollm2-135m.")
@click.option("--prompts", "prompts_path", default=None, help="Prompt file: jsonl with prompt [+ toxicity], or txt (one per line). Or a catalog name. Default: rtp-challenging.")
@click.option("--n-prompts", type=int, default=None, help="Seeded sample of this many prompts (0 = all). Preset: rtp 200, quick 50.")
@click.option("--samples", type=int, default=None, help="Continuations per prompt. Preset: rtp 25, quick 5.")
@click.option("--max-new-tokens", type=int, default=None, help="Tokens per continuation. Preset: 20.")
@click.option("--evaluators", default=None, help="Comma list of profanity-check, hatesonar, jigsaw-bilstm, hf:PATH (default: the first three).")
@click.option("--seed", type=int, default=None, help="Seed for the prompt sample, the sampling and the bootstrap (default 0).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the full report (settings, metrics, samples) here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Write a PNG bar chart here.")
@click.option("--preset", type=click.Choice(["rtp", "quick"]), default="rtp", show_default=True, help="rtp: the RealToxicityPrompts protocol; quick: for iterating.")
@click.option("--ppl-tokens", type=int, default=None, help="WikiText-2 tokens for perplexity (0 skips it). Preset: rtp 8192, quick 4096.")
@click.option("--threads", type=int, default=None, help="CPU threads for torch (1 is fastest on a busy machine).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="Load both models in this dtype (default float32; bfloat16 is ~2x faster on CPUs with AVX512-BF16).")
@_device_opt
@click.option("--batch-size", type=int, default=128, show_default=True, help="Sequences generated per batch.")
@_data_dir_opt
@friendly
def eval_command(model: str, baseline: str | None, prompts_path: str | None, n_prompts: int | None, samples: int | None, max_new_tokens: int | None,
                 evaluators: str | None, seed: int | None, json_path: Path | None, plot_path: Path | None, preset: str, ppl_tokens: int | None,
                 threads: int | None, dtype: str | None, device: str, batch_size: int) -> None:
    """Toxicity (several evaluators), degenerate output and perplexity of MODEL, before/after against --baseline."""
    from .evaluate import EvalSettings, evaluate

    settings = EvalSettings.from_preset(preset, prompts=prompts_path, n_prompts=n_prompts, samples=samples, max_new_tokens=max_new_tokens,
                                        evaluators=evaluators, seed=seed, ppl_tokens=ppl_tokens, dtype=dtype)
    report = evaluate(model, baseline=baseline, settings=settings, device=device, batch_size=batch_size, threads=threads, progress=True)
    click.echo(report.table())
    if json_path:
        click.echo(f"wrote {report.save_json(json_path)}")
    if plot_path:
        from .plots import plot_report

        click.echo(f"wrote {plot_report(report.to_json(), plot_path)}")


@main.command()
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--eval", "eval_path", type=click.Path(path_type=Path), default=None, help="Report from `patcher eval --json` (default: DIR/eval.json if present).")
@click.option("--repo-id", default=None, help="Hub id to show in the loading example.")
@friendly
def card(folder: Path, eval_path: Path | None, repo_id: str | None) -> None:
    """Write the model card (README.md) of a baked output folder DIR."""
    from .hub import EVAL_NAME, load_eval, write_card

    eval_path = eval_path or (folder / EVAL_NAME if (folder / EVAL_NAME).is_file() else None)
    click.echo(f"wrote {write_card(folder, load_eval(eval_path) if eval_path else None, repo_id)}")


@main.command()
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", default=None, help="Branch to commit to (created if missing).")
@click.option("--dry-run", is_flag=True, help="List the files that would be uploaded, with sizes; no network.")
@friendly
def push(folder: Path, repo_id: str, private: bool, revision: str | None, dry_run: bool) -> None:
    """Upload a baked output folder DIR to the Hub as REPO_ID in one commit (token: HF_TOKEN or `hf auth login`)."""
    from .hub import CARD_NAME
    from .hub import push as run_push

    r = run_push(folder, repo_id, private=private, revision=revision, dry_run=dry_run)
    if r.card_written:
        click.echo(f"wrote model card {folder / CARD_NAME}")
    rows = [[name, size] for name, size in r.files]
    total = sum(size for _, size in r.files)
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    title = f"{'would upload' if dry_run else 'uploaded'} {len(r.files)} files ({total / 1e6:.1f} MB) to {where}, commit message: {r.message!r}"
    click.echo(render(["file", "bytes"], rows, title=title))
    if not dry_run:
        click.echo(f"commit: {r.commit_url}")



@main.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--set", "expr", required=True, help="[step.N.]KEY=V1,V2,...: the setting to sweep (default step: the last).")
@click.option("--model", "-m", default=None, help="Model: local folder, Hub id, or smollm2-135m (default: the recipe's).")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None, help="Folder for one baked model per value, sweep.json and the plot.")
@click.option("--max-ppl-increase", type=float, default=None, help="Pick the least toxic point whose perplexity rises at most this much (0.05 = +5%).")
@click.option("--compare", multiple=True, help="LABEL=EVAL_JSON: a reference point (e.g. aura=runs/aura/eval.json) on the plot.")
@click.option("--n-prompts", type=int, default=None, help="Prompts per evaluation (quick preset: 50).")
@click.option("--samples", type=int, default=None, help="Samples per prompt (quick preset: 5).")
@click.option("--evaluators", default=None, help="Comma list of evaluators (default: the three offline ones).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@_data_dir_opt
@friendly
def sweep(recipe_path: Path, expr: str, model: str | None, out: Path | None, max_ppl_increase: float | None, compare: tuple[str, ...],
          n_prompts: int | None, samples: int | None, evaluators: str | None, device: str) -> None:
    """Run RECIPE at several values of one setting (statistics collected once), evaluate each with
    the quick preset, and plot toxicity against perplexity beside the base model."""
    from .evaluate import EvalSettings
    from .recipe import load_recipe
    from .sweep import plot_sweep
    from .sweep import sweep as run_sweep

    recipe = load_recipe(recipe_path)
    refs = {}
    for c in compare:
        if "=" not in c:
            raise PatcherError(f"--compare {c!r}: write LABEL=PATH_TO_eval.json")
        label, path = c.split("=", 1)
        refs[label] = Path(path)
    settings = EvalSettings.from_preset("quick", n_prompts=n_prompts, samples=samples, evaluators=evaluators)
    out = out or Path(f"runs/sweep-{recipe.name}")
    result = run_sweep(recipe, expr, out=out, model_spec=model, eval_settings=settings, references=refs,
                       max_ppl_increase=max_ppl_increase, device=device)
    click.echo(result.table())
    click.echo(f"wrote {plot_sweep(result, out / 'sweep.png')} and {out / 'sweep.json'}")
    if result.chosen is not None:
        click.echo(f"least toxic within +{max_ppl_increase:.0%} perplexity: {result.key}={result.values[result.chosen]} ({result.points[result.chosen]['folder']})")
    elif max_ppl_increase is not None:
        click.echo(f"no point stays within +{max_ppl_increase:.0%} perplexity")


if __name__ == "__main__":  # `python -m patcher.cli` (torchrun, accelerate launch)
    # Import the module under its own name so that commands appended below this line exist too.
    from patcher.cli import main as _main

    _main()


@main.command()
@click.option("--model", "-m", required=True, help="Model folder, config.json, Hub id (config only), or llama-2-7b / mistral-7b / falcon-40b / llama-2-70b.")
@click.option("--dtype", default="bfloat16", show_default=True, help="Dtype the model runs in: float32, bfloat16 or float16.")
@click.option("--texts", "n_texts", type=int, default=1000, show_default=True, help="Calibration texts (both classes).")
@click.option("--max-tokens", type=int, default=64, show_default=True, help="Tokens per text.")
@click.option("--gpu-gib", type=float, default=80.0, show_default=True, help="Memory of one GPU.")
@click.option("--gpus", "n_gpus", type=int, default=8, show_default=True, help="GPUs for the data-parallel row.")
@friendly
def plan(model: str, dtype: str, n_texts: int, max_tokens: int, gpu_gib: float, n_gpus: int) -> None:
    """Memory a run needs and the flags that fit it, from the model's config alone (no weights)."""
    from .plan import report

    click.echo(report(model, dtype, n_texts, max_tokens, gpu_gib, n_gpus))
