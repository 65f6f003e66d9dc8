"""The `patcher` command line. Every command is a thin shell over the workflows and the Python API;
a PatcherError becomes one line on stderr and exit status 2. Options that mirror a recipe or
evaluation setting are generated from the settings dataclasses (`setting_option`, and the option
groups `settings_options` / `eval_options` / `placement_options`, each handing the command ONE typed
object), so a value has one name and one help text in the recipe, on the command line and in the
code, and no command function takes more than 8 parameters. Messages go through
the ``patcher`` logger (``-v`` / ``-q``), results tables to stdout."""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .collect.sae_fit import TrainSettings
from .core.errors import PatcherError
from .core.placement import COLLECT_ONLY, Placement
from .core.table import render
from .core.threads import configure_threads
from .evaluate.report import EvalSettings
from .recipe.loader import CollectSettings, ModelSettings
from .recipe.settings import help_of
from .workflows.sae import TextWindows
from .workflows.tune.search import TuneOptions

# What to do about an operating-system error a user can cause (full disk, read-only place, ...).
OS_FIXES = {
    errno.ENOSPC: "free some space or choose an --out on another disk",
    errno.EDQUOT: "free some space (disk quota) or choose an --out on another disk",
    errno.EROFS: "that filesystem is read-only: choose a writable --out",
    errno.EACCES: "no permission there: choose a writable --out or fix the permissions",
    errno.EPERM: "not permitted there (read-only or immutable file?): choose a writable --out or fix the attributes",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter --out",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "that is a folder: name a file",
    errno.EEXIST: "it already exists: choose another --out",
    errno.EIO: "the disk reported an I/O error: check it, or choose another --out",
}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def os_error_message(exc: OSError) -> str:
    """One line for an OSError: what failed, where, and what to do (the staging folder of an
    output is already gone: outputs are written in a temporary sibling removed on any failure)."""
    where = exc.filename if exc.filename is not None else "?"
    what = exc.strerror or type(exc).__name__
    fix = OS_FIXES.get(exc.errno, "check the path, the disk and the permissions")
    return _one_line(f"{what} ({where}): {fix}; nothing was written")


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a PatcherError, or an OSError a user can cause (disk full, read-only or immutable place,
    a too-long name), into one line ``patcher: error: ...`` and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PatcherError as exc:
            click.echo(f"patcher: error: {_one_line(exc)}", err=True)
            sys.exit(2)
        except OSError as exc:
            click.echo(f"patcher: error: {os_error_message(exc)}", err=True)
            sys.exit(2)

    return wrapper


def _trust_opt(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--trust-remote-code``: the only way to let a model's own Python code run or be copied
    (a recipe may not ask for it)."""
    return click.option("--trust-remote-code", is_flag=True,
                        help="Run the model's own Python code (transformers' trust_remote_code) and copy its .py files; only for models you trust.")(fn)


def _file_outputs(*pairs: tuple[Path | None, list[Any]]) -> None:
    """The output guard for files a command writes (--json, --plot): never an input, never inside one."""
    from .io.folders import check_output_path

    for out, inputs in pairs:
        if out is not None:
            check_output_path(out, None, True, inputs, kind="file")


def setting_option(cls: type, name: str, *decls: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A click option for settings field ``name`` of dataclass ``cls``: its help text comes from the
    field, its flag is ``--name-with-dashes`` unless ``decls`` are given, and its default is None
    (the recipe's or the preset's value is kept unless the flag is given)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    hint = typing.get_type_hints(cls)[name]
    base = next((t for t in (int, float, bool, str) if hint is t or t in typing.get_args(hint)), str)
    decls = decls or (f"--{name.replace('_', '-')}",)
    if all(d.startswith("-") for d in decls):
        decls = (*decls, name)  # the Python parameter is the setting's name
    kwargs.setdefault("type", base)
    return click.option(*decls, default=None, help=help_of(cls, field.name) + ".", **kwargs)


def _field_option(cls: type, f: dataclasses.Field, overrides: bool, extra: dict[str, Any]) -> Callable[..., Any]:
    """The click option of settings field ``f``: ``--name-with-dashes`` (or ``extra['decls']``), the
    field's help, its default (None with ``overrides``), its bounds as a click range; ``extra``:
    what the field cannot say."""
    hint, meta = typing.get_type_hints(cls)[f.name], f.metadata
    kinds = (hint, *typing.get_args(hint))
    low, low_open = (meta["exclusive_minimum"], True) if meta.get("exclusive_minimum") is not None else (meta.get("minimum"), False)
    high = meta.get("maximum")
    kw: dict[str, Any] = {"help": meta["help"] + "."}
    if bool in kinds:
        kw["is_flag"] = True
    elif meta.get("choices"):
        kw["type"] = click.Choice(list(meta["choices"]))
    elif int in kinds:
        kw["type"] = click.IntRange(min=low, max=high) if low is not None or high is not None else int
    elif float in kinds:
        kw["type"] = click.FloatRange(min=low, max=high, min_open=low_open) if low is not None or high is not None else float
    elif Path in kinds:
        kw["type"] = click.Path(path_type=Path)
    if overrides:
        kw["default"] = None
    elif f.default is dataclasses.MISSING:
        kw["required"] = True
    else:
        kw["default"] = f.default
        if f.default is not None and not kw.get("is_flag"):
            kw["show_default"] = True
    kw |= extra
    decls = kw.pop("decls", (f"--{f.name.replace('_', '-')}",))
    return click.option(*decls, f.name, **kw)


def settings_options(cls: type, param: str, names: tuple[str, ...], build: Callable[[dict[str, Any]], Any] | None = None,
                     overrides: bool = False, **extra: dict[str, Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """An option group generated from settings dataclass ``cls``: one flag per field in ``names``, in
    that order (`_field_option`: one name and one help text in the code and on the command line);
    the command function receives ONE typed ``param``, ``build(values)`` (default ``cls(**values)``).
    ``overrides``: every flag defaults to None (not given: the preset's or recipe's value stays).
    ``extra[name]``: click keywords the field cannot declare (its flag's name, a range it leaves to
    a hand-written check)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    make = build or (lambda values: cls(**values))

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            return friendly(lambda: fn(*args, **{param: make(values)}, **kwargs))()

        for name in reversed(names):
            wrapper = _field_option(cls, fields[name], overrides, extra.get(name, {}))(wrapper)
        return wrapper

    return decorate


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message (a test runner swaps it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _configure_logging(verbose: int, quiet: int) -> None:
    """The ``patcher`` logger writes ``patcher: message`` lines to stderr; -v shows debug, -q only
    warnings (and hides progress bars, which follow the logger's level)."""
    level = logging.INFO - 10 * verbose + 10 * quiet
    logger = logging.getLogger("patcher")
    logger.setLevel(max(logging.DEBUG, min(logging.ERROR, level)))
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("patcher: %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


LAYER_HEADERS = ["layer", "edits", "units changed", "units", "mean factor", "proj rank"]


@click.group()
@click.option("-v", "--verbose", count=True, help="More messages (debug).")
@click.option("-q", "--quiet", count=True, help="Fewer messages: warnings and errors only, no progress bars.")
def main(verbose: int, quiet: int) -> None:
    """Detoxify causal language models by baking weight edits into plain safetensors checkpoints."""
    _configure_logging(verbose, quiet)
    configure_threads()


def placement_options(collect: bool = False, dtype_default: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The placement option group, generated from `Placement`'s fields (flag ``--name-with-dashes``,
    the field's help, default, choices and lower bound): the command function receives ONE
    ``placement: Placement``. ``collect``: also the collection-only flags (``--resume``,
    ``--checkpoint-every``). ``dtype_default``: what ``--dtype`` shows as its default."""
    fields = [f for f in dataclasses.fields(Placement) if collect or not f.metadata[COLLECT_ONLY]]

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(f.name) for f in fields}

            def call() -> Any:
                placement = Placement(**values)
                if placement.threads is not None:
                    configure_threads(placement.threads)
                return fn(*args, placement=placement, **kwargs)

            return friendly(call)()

        for f in reversed(fields):
            meta, hint = f.metadata, typing.get_type_hints(Placement)[f.name]
            kw: dict[str, Any] = {"default": f.default, "help": meta["help"] + "."}
            if meta["is_flag"]:
                kw["is_flag"] = True
            elif meta["choices"]:
                kw["type"] = click.Choice(list(meta["choices"]))
            elif int in typing.get_args(hint) or hint is int:
                kw["type"] = click.IntRange(min=meta["minimum"])
            elif hint is float:
                kw["type"] = click.FloatRange(min=meta["minimum"])
            if f.name == "dtype" and dtype_default:
                kw["default"] = dtype_default
            if kw["default"] is not None and not meta["is_flag"]:
                kw["show_default"] = True
            wrapper = click.option(f"--{f.name.replace('_', '-')}", f.name, **kw)(wrapper)
        return wrapper

    return decorate


def _nonfinite_opt(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--allow-nonfinite", is_flag=True,
                        help="Copy untouched source tensors that hold NaN or inf as they are (refused by default; edited tensors must be finite).")(fn)


@main.command()
@click.argument("patch_path", metavar="PATCH", type=click.Path(path_type=Path))
@click.option("--model", "-m", required=True, help="Base model: local folder, Hub id, or smollm2-135m.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder (only once the new one is complete).")
@click.option("--untie", is_flag=True, help="Allow edits on tied embeddings by writing a separate lm_head.weight.")
@_nonfinite_opt
@click.option("--trust-remote-code", is_flag=True, help="Also copy the model's own Python files (*.py) into the output; only for models you trust.")
@friendly
def bake(patch_path: Path, model: str, out: Path, overwrite: bool, untie: bool, allow_nonfinite: bool, trust_remote_code: bool) -> None:
    """Bake PATCH into MODEL and write the result to OUT."""
    from .bake.writer import bake as run_bake
    from .edits.patch import Patch

    result = run_bake(Patch.load(patch_path), model, out, overwrite=overwrite, untie=untie, allow_nonfinite=allow_nonfinite,
                      trust_remote_code=trust_remote_code, inputs=(patch_path,))
    click.echo(f"wrote {result}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="PNG map of the heads and neurons a circuit patch removes.")
@friendly
def inspect(path: Path, plot: Path | None) -> None:
    """Show the edits of a patch or a baked output folder, per layer and tensor."""
    from .edits.patch import Patch
    from .methods.circuit import SUMMARY_HEADERS, Circuit, plot_circuit

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
@click.option("--base", default=None, help="The base model (folder, Hub id or smollm2-135m), when it is not where the record says.")
@placement_options()
@friendly
def verify(out: Path, no_logits: bool, base: str | None, placement: Placement) -> None:
    """Check that OUT is exactly its recorded base model plus its patch: every file against the
    record (unlisted files fail; README.md, the model card, is the exception), the patch hash, each
    tensor, and the logits."""
    from .bake.verify import verify as run_verify

    r = run_verify(out, logits=not no_logits, base=base, placement=placement)
    click.echo(f"files: {'ok' if not r.bad_files else 'MISMATCH ' + ', '.join(r.bad_files)}")
    click.echo(f"tensors: {'ok' if not r.bad_tensors else 'MISMATCH ' + ', '.join(r.bad_tensors[:10])}")
    if not no_logits:
        click.echo(f"logits: max abs diff {r.max_abs_diff:.3g} (tolerance {r.tolerance:.3g})")
    click.echo("verify: OK" if r.ok else "verify: FAILED")
    sys.exit(0 if r.ok else 1)


_recipe_arg = click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))
_model_opt = setting_option(ModelSettings, "id", "--model", "-m", "model")
_batch_opt = setting_option(CollectSettings, "batch_size", type=click.IntRange(min=1))


def _load_recipe(path: Path, model: str | None, batch_size: int | None, trust_remote_code: bool = False, placement: Placement | None = None) -> Any:
    """The recipe with the command line's overrides (recorded as such in patch.json);
    ``trust_remote_code`` comes only from here; ``--dtype`` overrides ``model.dtype``."""
    from .recipe.loader import load_recipe

    dtype = placement.dtype if placement is not None else None
    return (load_recipe(path).override("model", id=model).override("collect", batch_size=batch_size)
            .override("model", trust_remote_code=trust_remote_code or None).override("model", dtype=dtype))


def _set_data_dir(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    from .data.catalog import set_data_dir

    set_data_dir(value)  # None too: a command without --data-dir falls back to $PATCHER_DATA


_data_dir_opt = click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None, expose_value=False,
                             callback=_set_data_dir, help="Local folder with the catalog's data sets (default: $PATCHER_DATA; else the Hub).")


# What EvalSettings' fields leave to its hand-written `check`: the flags' ranges; --preset's choices.
_EVAL_FLAGS: dict[str, dict[str, Any]] = {
    "n_prompts": {"type": click.IntRange(min=0)}, "samples": {"type": click.IntRange(min=1)}, "max_new_tokens": {"type": click.IntRange(min=1)},
    "ppl_tokens": {"type": click.IntRange(min=0)}, "blimp": {"type": click.IntRange(min=0)}, "kl_prompts": {"type": click.IntRange(min=0)},
    "preset": {"type": click.Choice(["rtp", "quick"]), "default": "rtp", "show_default": True},
}


def eval_options(*names: str, preset: str = "rtp") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The evaluation settings ``names`` as flags (each keeps the preset's value unless given); the
    command function receives ONE ``settings: EvalSettings``, from ``--preset`` when ``names`` has
    it, else from ``preset``."""
    return settings_options(EvalSettings, "settings", names, overrides=True, **{n: _EVAL_FLAGS[n] for n in names if n in _EVAL_FLAGS},
                            build=lambda values: EvalSettings.from_preset(values.pop("preset", preset), **values))


@dataclasses.dataclass(frozen=True)
class RunSwitches:
    """`patcher run`'s switches: ``--force``, ``--overwrite``, ``--no-eval``, ``--gguf TYPE``, ``--allow-nonfinite``."""

    force: bool
    overwrite: bool
    no_eval: bool
    gguf: str | None
    allow_nonfinite: bool


@main.command()
@_recipe_arg
@_model_opt
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None, help="Output folder (default runs/RECIPE-MODEL).")
@_batch_opt
@click.option("--force", is_flag=True, help="Publish even when perplexity rises beyond the recipe's budget.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder once the new one is ready.")
@click.option("--no-eval", is_flag=True, help="Skip the recipe's [eval] table (the model card is written without an evaluation).")
@click.option("--gguf", "gguf", default=None, metavar="TYPE",
              help="Also write the output as model-TYPE.gguf inside it, TYPE f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1 (llama.cpp; see `patcher export`).")
@_nonfinite_opt
@_trust_opt
@placement_options(collect=True)
@_data_dir_opt
@friendly
def run(recipe_path: Path, model: str | None, out: Path | None, batch_size: int | None, trust_remote_code: bool, placement: Placement,
        **switches: Any) -> None:
    """Compute RECIPE's edits on a model, bake them, check perplexity, evaluate against the base
    model when the recipe has an [eval] table, and write the output folder with its model card.
    Data-parallel: `torchrun --nproc_per_node N -m patcher.cli run ...` (rank 0 writes)."""
    from .workflows.run import run as run_recipe

    s = RunSwitches(**switches)
    recipe = _load_recipe(recipe_path, model, batch_size, trust_remote_code, placement)
    r = run_recipe(recipe, out=out, placement=placement, force=s.force, overwrite=s.overwrite, run_eval=not s.no_eval,
                   allow_nonfinite=s.allow_nonfinite, gguf=s.gguf)
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
        from .evaluate.report import report_table

        click.echo()
        click.echo(report_table(r.eval_report))
    click.echo(f"wrote {r.out}")


@main.command()
@_recipe_arg
@_model_opt
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Folder for patch.json + patch.safetensors.")
@_batch_opt
@click.option("--overwrite", is_flag=True, help="Replace an existing patch folder (one patcher wrote).")
@_trust_opt
@placement_options(collect=True)
@_data_dir_opt
@friendly
def compute(recipe_path: Path, model: str | None, out: Path, batch_size: int | None, overwrite: bool, trust_remote_code: bool,
            placement: Placement) -> None:
    """Compute RECIPE's patch without baking it (bake later with `patcher bake`)."""
    from .workflows.run import compute as run_compute

    patch = run_compute(_load_recipe(recipe_path, model, batch_size, trust_remote_code, placement), out, placement=placement, overwrite=overwrite)
    if patch is None:  # a data-parallel rank other than 0
        return
    click.echo(render(LAYER_HEADERS, patch.per_layer(), title="edits per layer"))
    click.echo(f"wrote {out}")


@main.command()
@_recipe_arg
@_model_opt
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write every score to this JSON file.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Write a heat map (PNG) of the scores.")
@click.option("--top", type=int, default=10, show_default=True, help="How many layers the table shows.")
@_batch_opt
@_trust_opt
@placement_options()
@_data_dir_opt
@friendly
def localize(recipe_path: Path, model: str | None, json_path: Path | None, plot_path: Path | None, top: int, batch_size: int | None,
             trust_remote_code: bool, placement: Placement) -> None:
    """Where toxic and neutral text differ: effect size per layer and block (attn_out, mlp_out), and
    per MLP neuron, on RECIPE's data (paired when its step says paired = true)."""
    from .io.model_files import resolve_model
    from .workflows.localize import localize_recipe
    from .workflows.run import recipe_inputs

    recipe = _load_recipe(recipe_path, model, batch_size, trust_remote_code, placement)
    inputs = [*recipe_inputs(recipe), resolve_model(recipe.model.id, recipe.model.revision, recipe.model.trust_remote_code)[0]]
    _file_outputs((json_path, inputs), (plot_path, inputs))
    loc = localize_recipe(recipe, placement=placement)
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
@eval_options("prompts", "n_prompts", "samples", "max_new_tokens", "evaluators", "seed", "preset", "ppl_tokens", "blimp", "kl_prompts")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the full report (settings, metrics, samples) here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Write a PNG bar chart here.")
@placement_options()
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True, help="Sequences generated per batch.")
@_data_dir_opt
@friendly
def eval_command(model: str, baseline: str | None, settings: EvalSettings, json_path: Path | None, plot_path: Path | None,
                 placement: Placement, batch_size: int) -> None:
    """Toxicity (several evaluators), degenerate output, perplexity and capability (BLiMP, KL from the
    baseline on neutral prompts) of MODEL, before/after against --baseline; MODEL may be a GGUF file
    (generation in llama.cpp)."""
    from .evaluate.report import evaluate

    settings = dataclasses.replace(settings, dtype=placement.dtype_or(settings.dtype))
    inputs = [model, baseline, settings.prompts, settings.ppl_text]
    _file_outputs((json_path, inputs), (plot_path, inputs))
    report = evaluate(model, baseline=baseline, settings=settings, placement=placement, batch_size=batch_size)
    click.echo(report.table())
    if json_path:
        click.echo(f"wrote {report.save_json(json_path)}")
    if plot_path:
        from .evaluate.plots import plot_report

        click.echo(f"wrote {plot_report(report.to_json(), plot_path)}")


def _gguf_name(folder: Path, gguf: str | None, outtype: str) -> str | None:
    """``--gguf``: a file name, or a path whose folder is DIR itself (the GGUF lives in the output)."""
    if gguf is None or "/" not in gguf:
        return gguf
    p = Path(gguf)
    if p.parent.resolve() != folder.resolve():
        raise PatcherError(f"--gguf {gguf}: the GGUF is written inside the output folder {folder} (it travels with the model, "
                           f"its record, `verify` and `push`): give a file name such as model-{outtype}.gguf")
    return p.name


@main.command()
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--gguf", "gguf", default=None, help="GGUF file name inside DIR [default: model-OUTTYPE.gguf].")
@click.option("--outtype", default="f16", show_default=True,
              help="Tensor type of the GGUF: f32, f16, bf16, q8_0 (llama.cpp's converter) or q4_0, q4_1, q5_0, q5_1 "
                   "(its f16 quantized by the gguf package; embeddings and output q8_0); norms stay f32.")
@click.option("--overwrite", is_flag=True, help="Replace a GGUF of the same name that patcher exported before.")
@friendly
def export(folder: Path, gguf: str | None, outtype: str, overwrite: bool) -> None:
    """Write the baked output folder DIR as one GGUF file inside it (llama.cpp, Ollama, LM Studio), with
    an Ollama Modelfile beside it; both join the record, so `verify` checks them and `push` uploads them."""
    from .publish.gguf import export_gguf

    e = export_gguf(folder, _gguf_name(folder, gguf, outtype), outtype, overwrite=overwrite)
    click.echo(render(["file", "type", "bytes", "tensors", "tokenizer", "sha256"],
                      [[e["file"], e["outtype"], e["bytes"], e["tensors"], e["tokenizer"], e["sha256"][:16]]], title=f"GGUF ({e['converter']})"))
    click.echo(f"wrote {folder / e['file']} and {folder / e['modelfile']}")


@main.command()
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--eval", "eval_path", type=click.Path(path_type=Path), default=None, help="Report from `patcher eval --json` (default: DIR/eval.json if present).")
@click.option("--repo-id", default=None, help="Hub id to show in the loading example.")
@friendly
def card(folder: Path, eval_path: Path | None, repo_id: str | None) -> None:
    """Write the model card (README.md) of a baked output folder DIR."""
    from .io.record import read_record
    from .publish.card import CARD_NAME, EVAL_NAME, load_eval, write_card

    eval_path = eval_path or (folder / EVAL_NAME if (folder / EVAL_NAME).is_file() else None)
    read_record(folder)  # a baked folder with a consistent record, before anything is written
    _file_outputs((folder / CARD_NAME, [eval_path] if eval_path and Path(eval_path).resolve().parent != folder.resolve() else []))
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
    from .publish.card import CARD_NAME
    from .publish.push import push as run_push

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



@dataclasses.dataclass(frozen=True)
class SweepPick:
    """`patcher sweep`'s choice among its points (``--max-ppl-increase``) and the reference points
    drawn beside them (``--compare LABEL=EVAL_JSON``)."""

    max_ppl_increase: float | None
    compare: tuple[str, ...]

    def references(self) -> dict[str, Path]:
        refs = {}
        for c in self.compare:
            if "=" not in c:
                raise PatcherError(f"--compare {c!r}: write LABEL=PATH_TO_eval.json")
            label, path = c.split("=", 1)
            refs[label] = Path(path)
        return refs


@main.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--set", "expr", required=True, help="[step.N.]KEY=V1,V2,...: the setting to sweep (default step: the last).")
@_model_opt
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None, help="Folder for one baked model per value, sweep.json and the plot.")
@click.option("--max-ppl-increase", type=float, default=None, help="Pick the least toxic point whose perplexity rises at most this much (0.05 = +5%).")
@click.option("--compare", multiple=True, help="LABEL=EVAL_JSON: a reference point (e.g. aura=runs/aura/eval.json) on the plot.")
@eval_options("n_prompts", "samples", "evaluators", preset="quick")
@_trust_opt
@placement_options()
@_data_dir_opt
@friendly
def sweep(recipe_path: Path, expr: str, model: str | None, out: Path | None, settings: EvalSettings, trust_remote_code: bool, placement: Placement,
          **pick: Any) -> None:
    """Run RECIPE at several values of one setting (statistics collected once), evaluate each with
    the quick preset, and plot toxicity against perplexity beside the base model."""
    from .workflows.sweep import plot_sweep
    from .workflows.sweep import sweep as run_sweep

    choice = SweepPick(**pick)
    recipe = _load_recipe(recipe_path, model, None, trust_remote_code, placement)
    refs = choice.references()
    out = out or Path(f"runs/sweep-{recipe.name}")
    result = run_sweep(recipe, expr, out=out, eval_settings=settings, references=refs,
                       max_ppl_increase=choice.max_ppl_increase, placement=placement.replace(checkpoint_every=0))
    click.echo(result.table())
    click.echo(f"wrote {plot_sweep(result, out / 'sweep.png')} and {out / 'sweep.json'}")
    if result.chosen is not None:
        click.echo(f"least toxic within +{choice.max_ppl_increase:.0%} perplexity: {result.key}={result.values[result.chosen]} "
                   f"({result.points[result.chosen]['folder']})")
    elif choice.max_ppl_increase is not None:
        click.echo(f"no point stays within +{choice.max_ppl_increase:.0%} perplexity")


def _comma_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    """A comma list flag as a tuple (not given or empty: None)."""
    return tuple(e.strip() for e in value.split(",") if e.strip()) if value else None


@main.command()
@_recipe_arg
@_model_opt
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="The tuned recipe (TOML); OUT.tune.json and OUT.tune.png are written beside it.")
@settings_options(TuneOptions, "options", ("max_ppl_increase", "trials", "timeout", "study_path", "seed", "candidates", "eval_n_prompts", "evaluators"),
                  study_path={"decls": ("--study",)}, evaluators={"type": str, "callback": _comma_list})
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@placement_options()
@friendly
def tune(recipe_path: Path, model: str | None, out: Path, options: TuneOptions, overwrite: bool, placement: Placement) -> None:
    """Search RECIPE's settings (its [tune] table, or each step's strength in [0, 1]) for the least
    toxic within a perplexity budget: Optuna TPE on a toxicity proxy and the check perplexity, hooks
    instead of bakes, the pick made by the quick evaluation; writes the tuned recipe to OUT."""
    from .workflows.tune import tune as run_tune

    recipe = _load_recipe(recipe_path, model, None, placement=placement)
    result = run_tune(recipe, out=out, placement=placement, overwrite=overwrite, **dataclasses.asdict(options))
    click.echo(result.table())
    s = result.seconds
    ran = (f"{s['trials_this_run']} run now, {s['per_trial_mean']:.1f} s per trial on average, median {s['per_trial_median']:.1f} s"
           if s["trials_this_run"] else "none run now: the study had them")
    click.echo(f"{len(result.trials)} trials in the study ({ran}); search {s['search']:.0f} s, evaluation {s['evaluate']:.0f} s; "
               f"{result.collections} statistics collections")
    if result.spearman is not None:
        click.echo(f"proxy vs quick evaluation over {len(result.evaluated)} evaluated trials: Spearman {result.spearman:.2f} "
                   f"(toxicity probability), {result.spearman_mean_toxicity:.2f} (mean toxicity)")
    stem = out.with_suffix("")
    click.echo(f"wrote {stem}.tune.json and {stem}.tune.png")
    if result.out is not None:
        click.echo(f"tuned recipe: {result.out} ({', '.join(f'{k} = {v:.4g}' if isinstance(v, float) else f'{k} = {v}' for k, v in result.chosen_settings.items())}); "
                   f"bake it with: patcher run {result.out}")
    else:
        click.echo(f"no trial stayed within +{options.max_ppl_increase:.1%} perplexity: nothing written to {out}; raise the budget or narrow the ranges")


@main.command()
@click.option("--model", "-m", required=True, help="Model folder, config.json, Hub id (config only), or llama-2-7b / mistral-7b / falcon-40b / llama-2-70b.")
@click.option("--texts", "n_texts", type=int, default=1000, show_default=True, help="Calibration texts (both classes).")
@click.option("--max-tokens", type=int, default=64, show_default=True, help="Tokens per text.")
@click.option("--gpu-gib", type=float, default=80.0, show_default=True, help="Memory of one GPU.")
@click.option("--gpus", "n_gpus", type=int, default=8, show_default=True, help="GPUs for the data-parallel row.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Texts per collection batch (and sequences per generation batch).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the predicted peaks (bytes) to this JSON file.")
@placement_options()
@friendly
def plan(model: str, n_texts: int, max_tokens: int, gpu_gib: float, n_gpus: int, batch_size: int, json_path: Path | None, placement: Placement) -> None:
    """Memory a run needs and the flags that fit it, from the model's config alone (no weights); with
    placement flags, each command's and method's predicted peak under that placement."""
    from .workflows.plan import Workload, report

    _file_outputs((json_path, [model]))
    click.echo(report(model, placement.dtype or "bfloat16", Workload(n_texts=n_texts, max_tokens=max_tokens, batch_size=batch_size), gpu_gib, n_gpus,
                      placement=placement, json_path=json_path))


@main.group()
def sae() -> None:
    """Sparse autoencoders for `direction = "sae"` recipes (README, SAEs)."""


@sae.command("train")
@click.option("--model", "-m", required=True, help="Model: smollm2-135m, gemma3-270m, a local folder or a Hub id.")
@click.option("--layers", required=True, help="Residual stream after these layers: 12, 6,12 or 4-8 (one SAE each).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Folder for layer-N/ SAELens folders and sae.json (a recipe's sae_path names OUT/layer-N).")
@settings_options(TextWindows, "text", ("tokens", "context"))
@settings_options(TrainSettings, "settings", ("expansion", "l1", "steps", "batch", "lr", "seed"))
@click.option("--overwrite", is_flag=True, help="Replace an existing SAE folder patcher wrote (with sae.json).")
@_trust_opt
@placement_options()
@_data_dir_opt
@friendly
def sae_train(model: str, layers: str, out: Path, text: TextWindows, settings: TrainSettings, overwrite: bool, trust_remote_code: bool,
              placement: Placement) -> None:
    """Train residual-stream SAEs on MODEL (WikiText-2, BOLD, non-toxic labelled rows) and report
    their quality: explained variance, dead features, L0, and perplexity with each spliced in."""
    from .workflows.sae import train

    placement.refuse("sae train (its activations come from one whole forward pass)", "run it without them (the model is loaded whole on --device)",
                     sequential=placement.sequential, device_map=bool(placement.device_map))
    r = train(model, layers, out, text=text, device=placement.device, overwrite=overwrite, trust_remote_code=trust_remote_code, settings=settings)
    rows = [[x.layer, f"{x.quality['explained_variance']:.3f}", f"{x.quality['dead_features']} ({x.quality['dead_share']:.1%})",
             f"{x.quality['l0']:.1f}", f"{x.ppl_base:.2f}", f"{x.ppl_spliced:.2f} ({x.ppl_increase:+.1%})", round(x.seconds)] for x in r.layers]
    click.echo(render(["layer", "explained var", "dead", "L0", "ppl", "ppl spliced", "seconds"], rows, title=f"SAEs on {r.tokens} tokens (held-out tenth scored)"))
    click.echo(f"wrote {out}")


if __name__ == "__main__":  # `python -m patcher.cli` (torchrun, accelerate launch)
    main()
