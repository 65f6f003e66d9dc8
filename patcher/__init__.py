"""patcher: detoxified checkpoints by baking weight edits computed from a model's own activations.

The public API is small: build or load a `Patch` of Edits, `bake` it into a checkpoint, `verify`
the result."""

from .bake import bake
from .edits import AffineOutputs, Edit, ProjectOutputs, ScaleInputs, ScaleOutputs, ZeroHeads, ZeroNeurons
from .errors import PatcherError
from .patch import Patch
from .verify import verify

__all__ = ["AffineOutputs", "Edit", "Patch", "PatcherError", "ProjectOutputs", "ScaleInputs", "ScaleOutputs", "ZeroHeads", "ZeroNeurons", "bake", "verify"]
