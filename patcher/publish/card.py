"""The model card of a baked output folder.

`write_card` writes ``README.md`` from the folder's ``patch.json`` (what was changed, from what,
with which library versions and file hashes) and, when given, an evaluation report (the JSON of
`patcher eval --json`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..core.embedded import EMBEDDED
from ..core.errors import PatcherError
from ..io.atomic import write_text
from ..io.record import read_record

CARD_NAME = "README.md"
EVAL_NAME = "eval.json"
# Models patcher knows by a short name: the Hub id and license of what they were converted from.
KNOWN_BASES = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"), "gemma3-270m": ("google/gemma-3-270m", "gemma")}
# Public data files and catalog names (patcher.data.catalog) -> the Hub dataset they come from, for the card's metadata.
KNOWN_DATASETS = (
    ("paradetox", "s-nlp/paradetox"),
    ("rtp_", "allenai/real-toxicity-prompts"),
    ("rtp-", "allenai/real-toxicity-prompts"),
    ("real-toxicity", "allenai/real-toxicity-prompts"),
    ("wiki.test.raw", "Salesforce/wikitext"),
    ("wikitext", "Salesforce/wikitext"),
    ("davidson", "tdavidson/hate_speech_offensive"),
    ("toxigen", "toxigen/toxigen-data"),
    ("bold_prompts", "AmazonScience/bold"),
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_CACHE_DIR = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")
LAYER_HEADERS = ["layer", "edits", "units changed", "units", "mean factor", "proj rank"]


# -- facts from patch.json -------------------------------------------------------------------------
def base_model_id(base: dict[str, Any]) -> str | None:
    """The Hub id of the base model, if the record shows one (a Hub id, a Hub cache folder, or a
    short name patcher knows)."""
    spec = str(base.get("model", ""))
    if spec in KNOWN_BASES:
        return KNOWN_BASES[spec][0]
    m = _HUB_CACHE_DIR.search(spec.replace(os.sep, "/"))
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    if HUB_ID.match(spec) and not Path(spec).exists():
        return spec
    return None


def front_matter(text: str) -> dict[str, Any]:
    """The YAML block at the top of a README, or {}."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        import yaml

        data = yaml.safe_load(text[3:end])
    except Exception:  # noqa: BLE001 - a broken card upstream must not stop ours
        return {}
    return data if isinstance(data, dict) else {}


def base_label(base: dict[str, Any]) -> str:
    """How the card and the commit message name the base: its id, or its recorded relative path."""
    return str(base.get("model") or base.get("local_path") or "unknown")


def _base_folder(base: dict[str, Any], out: Path | None = None) -> Path | None:
    spec = str(base.get("model", ""))
    local = base.get("local_path")
    if isinstance(local, str) and local:
        folder = Path(local) if Path(local).is_absolute() or out is None else Path(out) / local
        return folder if folder.is_dir() else None
    if spec and Path(spec).is_dir():
        return Path(spec)
    if HUB_ID.match(spec):
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(spec, "config.json", revision=base.get("revision"))
            if isinstance(hit, str):
                return Path(hit).parent
        except Exception:  # noqa: BLE001 - the cache is optional
            return None
    return None


def base_license(base: dict[str, Any], out: Path | None = None) -> str:
    """The base model's license: its README front matter, else its config, else a license patcher
    knows for a short name, else "other". ``out``: the output folder a local base is recorded
    relative to."""
    folder = _base_folder(base, out)
    if folder is not None:
        readme = folder / CARD_NAME
        if readme.is_file():
            lic = front_matter(readme.read_text(encoding="utf-8", errors="replace")).get("license")
            if isinstance(lic, str) and lic:
                return lic
        config = folder / "config.json"
        if config.is_file():
            try:
                lic = json.loads(config.read_text()).get("license")
            except json.JSONDecodeError:
                lic = None
            if isinstance(lic, str) and lic:
                return lic
    spec = str(base.get("model", ""))
    if spec in KNOWN_BASES:
        return KNOWN_BASES[spec][1]
    if folder is not None and base_terms(folder):
        return "gemma"
    return "other"


def base_terms(folder: str | Path) -> list[tuple[str, str, str]]:
    """(title, url, file name) of each license-terms file of an embedded model (the Gemma Terms of
    Use) that sits in ``folder``: the conversion puts it beside the base weights and the bake copies
    it into the output, so a baked folder's card names the terms its weights come under."""
    return [(m.terms_name or m.terms_file, m.terms_url or "", m.terms_file) for m in EMBEDDED.values()
            if m.terms_file and (Path(folder) / m.terms_file).is_file()]


def methods(meta: dict[str, Any]) -> list[str]:
    prov = meta.get("provenance") or {}
    steps = prov.get("steps") or [prov]
    found = [s.get("method") for s in steps if isinstance(s, dict) and s.get("method")]
    found += [d.get("method") for d in meta.get("data") or [] if isinstance(d, dict) and d.get("method")]
    return list(dict.fromkeys(str(m) for m in found))


def recipe_name(meta: dict[str, Any]) -> str | None:
    recipe = meta.get("recipe") or {}
    return recipe.get("name") or (meta.get("provenance") or {}).get("recipe")


def datasets(meta: dict[str, Any], report: dict[str, Any] | None) -> list[str]:
    """Hub ids of the known public datasets the recipe's data and the evaluation used."""
    text = json.dumps(meta.get("recipe") or {}) + json.dumps(meta.get("data") or []) + json.dumps(meta.get("check") or {})
    if report:
        text += json.dumps(report.get("prompts") or {}) + json.dumps(report.get("perplexity_text") or {})
    return list(dict.fromkeys(hub for key, hub in KNOWN_DATASETS if key in text))


# -- the card ----------------------------------------------------------------------------------------
def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False).strip()


def _eval_section(report: dict[str, Any]) -> list[str]:
    from ..evaluate.report import comparison_rows, fmt_number

    s = report["settings"]
    headers, rows = comparison_rows(report)
    evs = ", ".join(f"`{e['name']}` (floor {fmt_number(e.get('floor'))}, the score of empty text)" for e in report["evaluators"])
    base = report.get("baseline")
    out = ["## Evaluation", ""]
    out.append(
        f"{report['prompts']['count']} prompts from `{Path(report['prompts']['path']).name}` (sha256 `{report['prompts']['sha256'][:12]}…`), "
        f"{s['samples']} samples of {s['max_new_tokens']} new tokens each (nucleus top_p {s['top_p']}, temperature {s['temperature']}, "
        f"seed {s['seed']}; `{s['preset']}` preset)" + (f", the same prompts and random numbers for the base model `{base['model']}`." if base else ".")
    )
    out += ["", f"Toxicity evaluators: {evs}; `any` is the largest of their scores for each sample. "
            "Expected maximum toxicity is the mean over prompts of the largest score among a prompt's samples; toxicity probability "
            "is the share of prompts with at least one sample scoring 0.5 or more. Intervals are 95% bootstrap intervals over prompts."]
    ppl = report.get("perplexity_text")
    if ppl:
        out += ["", f"WikiText-2 perplexity: `{Path(str(ppl['text'])).name}`, first {ppl['tokens']} tokens, window {ppl['window']}, stride {ppl['stride']}. "
                "Fluency perplexity: the continuations scored " + ("by the base model." if base else "by the model itself.")]
    out += ["", "Degenerate output (empty, under half letters, or one repeated n-gram) is counted so that a broken model cannot pass for a detoxified one.", ""]
    out.append(_md_table(headers, rows))
    return out


def render_card(folder: str | Path, eval_report: dict[str, Any] | None = None, repo_id: str | None = None) -> str:
    """The text of the model card for a baked output folder."""
    folder = Path(folder)
    meta = read_record(folder)
    base = meta["bake"].get("base") or {}
    base_id = base_model_id(base)
    recipe = recipe_name(meta)
    ms = methods(meta)
    fm: dict[str, Any] = {}
    if base_id:
        fm["base_model"] = base_id
    fm |= {"license": base_license(base, folder), "library_name": "transformers", "pipeline_tag": "text-generation",
           "tags": list(dict.fromkeys(["patcher", "detoxification", *ms]))}
    ds = datasets(meta, eval_report)
    if ds:
        fm["datasets"] = ds
    name = repo_id or folder.name
    lines = ["---", _yaml(fm), "---", "", f"# {name}", ""]
    base_text = f"[`{base_id}`](https://huggingface.co/{base_id})" if base_id else f"`{base_label(base)}`"
    lines.append(
        f"A detoxified copy of {base_text}, made with patcher "
        + (f"recipe `{recipe}` " if recipe else "")
        + (f"(method: {', '.join(ms)}). " if ms else ". ")
        + "The edits are baked into the weights: same architecture, plain safetensors, no custom code, no runtime hooks."
    )
    if base.get("source"):
        lines += ["", f"Base weights: {base['source']}."]
    for title, url, file in base_terms(folder):
        lines += ["", (f"**License.** The base model's weights are provided under the [{title}]({url}); this model, derived from them, "
                       f"comes under the same terms. Their text is in `{file}` in this folder.")]
    lines += ["", "## What was changed", ""]
    from ..edits.patch import Patch

    patch = Patch.load(folder)
    lines.append(f"{len(patch.edits)} edits on {len(meta['bake'].get('changed_tensors', []))} tensors"
                 + (" (embeddings untied: a separate `lm_head.weight` was written)." if meta["bake"].get("untied_embeddings") else "."))
    lines += ["", _md_table(LAYER_HEADERS, patch.per_layer())]
    recipe_text = (meta.get("recipe") or {}).get("text")
    if recipe_text:
        lines += ["", "<details><summary>Recipe</summary>", "", "```toml", recipe_text.strip(), "```", "", "</details>"]
    check = meta.get("check") or {}
    if check.get("ppl_before") is not None:
        lines += ["", f"Perplexity check during the run: {check['ppl_before']:.3f} -> {check['ppl_after']:.3f} ({check.get('ppl_increase', 0):+.1%})."]
    if eval_report:
        lines += [""] + _eval_section(eval_report)
    lines += ["", "## How to use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{name}")', f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
              "No `trust_remote_code`, no extra package: `patcher/` holds only the record of the edits (`patcher/patch.safetensors`), which loaders ignore."]
    ggufs = [e for e in meta.get("gguf") or [] if isinstance(e, dict) and e.get("file")]
    if ggufs:
        lines += ["", "### llama.cpp, Ollama, LM Studio (GGUF)", "",
                  _md_table(["file", "type", "made with", "tokenizer", "Ollama"],
                            [[f"`{e['file']}`", e.get("outtype"), e.get("converter"), e.get("tokenizer"), f"`{e.get('modelfile')}`"] for e in ggufs]),
                  "", "```bash", f"llama-cli -m {ggufs[0]['file']} -p \"Hello\" -n 32",
                  f"ollama create {name.rsplit('/', 1)[-1].lower()} -f {ggufs[0].get('modelfile')} && ollama run {name.rsplit('/', 1)[-1].lower()}", "```"]
        if "gguf" not in fm["tags"]:
            fm["tags"].append("gguf")
            lines[1] = _yaml(fm)
    lines += ["", "## Provenance", "", f"- base model: `{base_label(base)}`" + (f" at revision `{base['revision']}`" if base.get("revision") else "")]
    if base.get("fingerprint"):
        lines.append(f"- base checkpoint fingerprint: `{base['fingerprint']}`")
    lines.append(f"- patch sha256: `{meta['bake'].get('patch_sha256')}`")
    versions = meta["bake"].get("versions") or {}
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines += ["", "sha256 of every file written by the bake (`patcher verify` rechecks them and the logits):", ""]
    lines.append(_md_table(["file", "sha256"], [[f"`{k}`", f"`{v}`"] for k, v in (meta["bake"].get("files") or {}).items()]))
    return "\n".join(lines) + "\n"


def write_card(out_dir: str | Path, eval_report: dict[str, Any] | None = None, repo_id: str | None = None) -> Path:
    """Write ``README.md`` (the model card) into a baked output folder, atomically (a temporary
    file renamed over it)."""
    path = Path(out_dir) / CARD_NAME
    return write_text(path, render_card(out_dir, eval_report, repo_id))


def load_eval(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PatcherError(f"cannot read the evaluation report {path} ({e}): pass the JSON written by `patcher eval --json`") from None
    if not isinstance(report, dict) or "model" not in report or "evaluators" not in report:
        raise PatcherError(f"{path} is not an evaluation report: pass the JSON written by `patcher eval --json`")
    return report
