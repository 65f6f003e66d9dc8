"""Where and how a model runs: one settings object for every command that runs a model.

`Placement` is the user's choice of device, dtype, accelerate device map (memory budgets, offload
folder), layer-by-layer onloading, CPU threads, and (for the commands that collect statistics)
checkpoints to resume from. Every field declares its flag's help text, default and choices, so the
CLI's option group is generated from it (`patcher.cli.placement_options`) and a flag has one name and
one help text on every command. Workflows take a `Placement` as it is; a method or command that
cannot honour one of its choices refuses it in one line naming what works instead (`refuse`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import PatcherError
from .models import DTYPES, device_map_kwargs, parse_max_memory

COLLECT_ONLY = "collect_only"  # metadata key: the flag exists only on commands that collect (run, compute)


def option(default: Any, *, help: str, choices: tuple[Any, ...] | None = None, minimum: float | None = None,  # noqa: A002
           collect_only: bool = False, is_flag: bool = False) -> Any:
    """A placement field with what its flag needs: help text, choices, lower bound, whether it is a
    plain switch, and whether only the collecting commands take it."""
    meta = {"help": help, "choices": choices, "minimum": minimum, COLLECT_ONLY: collect_only, "is_flag": is_flag}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Placement:
    """One command's placement of its model(s); see the module docstring and docs/scaling.md."""

    device: str = option("cpu", help="Device to run on: cpu, cuda, cuda:N, mps or auto")
    dtype: str | None = option(None, choices=tuple(DTYPES),
                               help="Dtype the model runs in (default: the recipe's model.dtype; for eval the preset's; for verify the checkpoint's)")
    device_map: str | None = option(None, help="Place the model with accelerate: auto, balanced, sequential, or one device "
                                               "(GPUs, then CPU, then disk)")
    max_memory: str | None = option(None, help="Per-device budget for --device-map, e.g. 0=70GiB,1=70GiB,cpu=100GiB "
                                               "(generation's KV cache must fit in it too)")
    offload_folder: str | None = option(None, help="With --device-map: folder for the weights that fit in no budget "
                                                   "(default: a temporary folder removed with the model)")
    sequential: bool = option(False, is_flag=True, help="Run layer by layer from the shards: memory is one decoder layer plus "
                                                        "the hidden states of the texts in flight")
    hidden_max_gib: float = option(8.0, minimum=0.0, help="With --sequential: hidden states above this size go to a temporary file")
    threads: int | None = option(None, minimum=1, help="CPU threads for torch (default: the CPUs this process may use, by affinity "
                                                       "and cgroup quota)")
    resume: bool = option(False, is_flag=True, collect_only=True, help="Continue a killed run from its checkpoints (OUT.collect-state/)")
    checkpoint_every: int = option(16, minimum=0, collect_only=True, help="Checkpoint the statistics every N batches (0: never)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, low, choices = getattr(self, f.name), f.metadata["minimum"], f.metadata["choices"]
            flag = "--" + f.name.replace("_", "-")
            if low is not None and value is not None and not value >= low:
                raise PatcherError(f"{flag} must be at least {low}, got {value}")
            if choices is not None and value is not None and value not in choices:
                raise PatcherError(f"{flag} {value!r}: use one of {', '.join(choices)}")
        if self.max_memory and not self.device_map:
            raise PatcherError("--max-memory needs --device-map (e.g. --device-map auto --max-memory 0=70GiB,cpu=100GiB)")
        if self.offload_folder and not self.device_map:
            raise PatcherError("--offload-folder needs --device-map (e.g. --device-map auto --max-memory cpu=8GiB --offload-folder DIR)")
        if self.device_map and self.sequential:
            raise PatcherError("--device-map and --sequential exclude each other: --sequential loads one layer at a time on --device")
        if self.device_map:
            device_map_kwargs(self.device_map, self.max_memory)  # fail early on bad values

    @property
    def hidden_max_bytes(self) -> int:
        return int(self.hidden_max_gib * 2**30)

    def dtype_or(self, default: str) -> str:
        """The dtype to run in: this placement's, else ``default`` (the recipe's, the preset's)."""
        return self.dtype or default

    def replace(self, **changes: Any) -> Placement:
        return dataclasses.replace(self, **changes)

    def refuse(self, what: str, instead: str, **flags: bool) -> None:
        """Refuse the flags in ``flags`` that are set, for ``what``, naming what works ``instead``."""
        for name, on in flags.items():
            if on:
                raise PatcherError(f"{what} cannot run with --{name.replace('_', '-')}: {instead}")

    def reserve(self, nbytes: int) -> Placement:
        """This placement with ``nbytes`` (generation's KV cache, activations) taken out of the
        ``--max-memory`` budget of the device the inputs start on (the first GPU listed, else the
        CPU), so accelerate places fewer weights there; a budget too small to keep any is refused."""
        budget = parse_max_memory(self.max_memory)
        if not budget or nbytes <= 0:
            return self
        key = next((k for k in budget if k != "cpu"), "cpu")
        left = budget[key] - nbytes
        if left <= 0:
            raise PatcherError(f"--max-memory {self.max_memory}: device {key} holds {budget[key] / 2**30:.2f} GiB, less than the "
                               f"{nbytes / 2**30:.2f} GiB the KV cache and activations need: raise it or lower --batch-size")
        budget[key] = left
        return self.replace(max_memory=",".join(f"{k}={v}B" for k, v in budget.items()))

    def describe(self) -> dict[str, Any]:
        """The choices that differ from the defaults (for records and logs)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}


def kv_cache_bytes(config: Any, sequences: int, tokens: int, dtype: str) -> int:
    """Bytes of the key/value cache of ``sequences`` sequences of ``tokens`` tokens: two tensors per
    layer of ``kv_heads x head_dim`` per token (grouped-query attention counted), in ``dtype``."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    hidden = get("hidden_size") or get("n_embd") or 0
    heads = get("num_attention_heads") or get("n_head") or 1
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hidden // heads
    layers = get("num_hidden_layers") or get("n_layer") or 0
    item = {"float32": 4}.get(dtype, 2)
    return 2 * layers * kv_heads * head_dim * item * sequences * tokens

