"""The `patcher` command line. Every command is a thin shell over the Python API; a PatcherError
becomes one line on stderr and exit status 2."""

from __future__ import annotations

import functools
import re
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


_LAYER = re.compile(r"\.(\d+)\.")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@friendly
def inspect(path: Path) -> None:
    """Show the edits of a patch or a baked output folder, per layer and tensor."""
    from .patch import Patch

    patch = Patch.load(path)
    rows = []
    for e in patch.edits:
        m = _LAYER.search(e.module)
        rows.append([int(m.group(1)) if m else "-", e.module, e.kind, e.summary()])
    click.echo(render(["layer", "module", "edit", "summary"], rows, title=f"{len(patch.edits)} edits in {path}"))


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
