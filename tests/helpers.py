"""Shared test helpers: tiny random models of every supported family built from configs (no
download), their tokenizers, and small recipes with their data. Test modules import from here,
never from each other."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import transformers as T

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "llama": lambda: T.LlamaConfig(**COMMON, num_key_value_heads=2, **IDS),
    "mistral": lambda: T.MistralConfig(**COMMON, num_key_value_heads=2, **IDS),
    "qwen2": lambda: T.Qwen2Config(**COMMON, num_key_value_heads=2, **IDS),
    "qwen3": lambda: T.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=8, **IDS),
    "olmo": lambda: T.OlmoConfig(**COMMON, **IDS),
    "gemma2": lambda: T.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=8, **IDS),
    "gemma3_text": lambda: T.Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=8, **IDS),
    "phi3": lambda: T.Phi3Config(**COMMON, **IDS),
    "gpt2": lambda: T.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
    "gpt_neox": lambda: T.GPTNeoXConfig(**COMMON, **IDS),
    "falcon": lambda: T.FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **IDS),
}
FAMILIES = sorted(CONFIGS)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    # Random init leaves norms at 1 and biases at 0: perturb every parameter so that a wrong bias or
    # norm handling shows in the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_tiny(family: str, folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **save_kwargs) -> Path:
    tiny_model(family, seed).to(dtype).save_pretrained(folder, **save_kwargs)
    return folder


def tiny_tokenizer():
    """A character-level tokenizer over 96 ids (pad 0, bos 1, eos 2, unk 3), built offline."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?'\"-:;()@#&*/\n"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny_with_tokenizer(family: str, folder: Path, **kwargs) -> Path:
    save_tiny(family, folder, **kwargs)
    tiny_tokenizer().save_pretrained(folder)
    return folder


TOXIC_WORDS = ["idiot", "stupid", "moron", "fool", "jerk"]
NEUTRAL_WORDS = ["friend", "garden", "morning", "river", "music"]


def write_labeled(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rows.append({"text": f"you {rng.choice(TOXIC_WORDS)} number {i}", "label": 1})
        rows.append({"text": f"the {rng.choice(NEUTRAL_WORDS)} number {i}", "label": 0})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_recipe(folder: Path, model: Path | None = None, budget: float = 100.0, extra: str = "") -> Path:
    write_labeled(folder / "data.jsonl")
    (folder / "ppl.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    model_line = f'[model]\nid = "{model}"\n' if model else ""
    text = f"""name = "t"
{model_line}
[data]
path = "data.jsonl"
n_per_class = 20
max_tokens = 32

[collect]
batch_size = 8

[check]
ppl_text = "ppl.txt"
ppl_tokens = 256
ppl_window = 64
max_ppl_increase = {budget}

[[step]]
method = "aura"
{extra}
"""
    (folder / "recipe.toml").write_text(text)
    return folder / "recipe.toml"
