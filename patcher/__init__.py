"""patcher: detoxified checkpoints by baking weight edits computed from a model's own activations.

The public API is small: build or load a `Patch` of Edits, `bake` it into a checkpoint, `verify`
the result."""

from .core.threads import prefer_passive_wait

prefer_passive_wait()  # before torch loads its OpenMP runtime: see patcher.core.threads

from .bake.verify import verify  # noqa: E402 - after the wait policy
from .bake.writer import bake  # noqa: E402
from .core.errors import PatcherError  # noqa: E402
from .edits.edit import (  # noqa: E402
    AffineOutputs,
    Edit,
    ProjectOutputs,
    ScaleInputs,
    ScaleOutputs,
    ZeroHeads,
    ZeroNeurons,
)
from .edits.patch import Patch  # noqa: E402

__all__ = ["AffineOutputs", "Edit", "Patch", "PatcherError", "ProjectOutputs", "ScaleInputs", "ScaleOutputs", "ZeroHeads", "ZeroNeurons", "bake", "verify"]
