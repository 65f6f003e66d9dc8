"""Why probe directions remove no toxicity (issue 27): per layer of a recipe's model, the probe's
held-out accuracy, the cosine between its direction and the difference of class means, and how much
of the toxic-minus-neutral shift in what each MLP writes lies along the direction the edit removes
(the probe's weight vector, its activation pattern Cov w (Haufe et al. 2014), the mean difference).

    python benchmarks/probe_diagnosis.py recipes/project-probe.toml [--model M] [--json F]

Held-out numbers use the probe's own split (``holdout``): the shares are measured on the held-out
rows, the directions fitted on the rest."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from patcher.collect.collector import Collector
from patcher.core.arch import arch_for, num_layers, writer_module
from patcher.core.models import load_model
from patcher.core.table import render
from patcher.data.loaders import load_data
from patcher.io.model_files import resolve_model
from patcher.methods import StepContext
from patcher.methods.project import _split, frame, probe
from patcher.recipe.loader import load_recipe
from patcher.workflows.run import step_settings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    recipe = load_recipe(a.recipe)
    if a.model:
        recipe = recipe.override("model", id=a.model)
    s = replace(step_settings(recipe)[0], top_n=0, layers="all")
    folder, _ = resolve_model(recipe.model.id)
    model, tok = load_model(folder)
    data = load_data(recipe.data, tok)
    from patcher.methods.project import collect

    c = recipe.collect
    collector = Collector(model, tok, batch_size=c.batch_size, max_tokens=recipe.data.max_tokens, padding_side=c.padding_side, skip_first=c.skip_first)
    from patcher.edits.patch import Patch

    stats = collect(StepContext(model, tok, collector, data, Patch([])), s)
    arch = arch_for(model.config)
    rows, out = [], []
    for i in range(num_layers(model.config)):
        x, y = stats["pooled"].matrix(writer_module(arch, "mlp_out", i))
        f = frame(x, y, s)
        z = f.to_z(x)
        w, accs = probe(z, y, None, 1, s.probe_c, s.holdout, s.seed)
        train, test = _split(y, None, s.holdout, s.seed)
        xtr, ytr = x[train].double(), y[train]
        read = f.back(w)[:, 0]
        read = read / read.norm()
        md = xtr[ytr == 1].mean(0) - xtr[ytr == 0].mean(0)
        centred = torch.cat([xtr[ytr == c] - xtr[ytr == c].mean(0) for c in (0, 1)])
        pattern = centred.T @ (centred @ read) / len(centred)  # within-class covariance times the read direction
        xte, yte = x[test].double(), y[test]
        shift = xte[yte == 1].mean(0) - xte[yte == 0].mean(0)  # held-out toxic shift

        def share(u: torch.Tensor, shift: torch.Tensor = shift) -> float:
            u = u / u.norm()
            return float((u @ shift) ** 2 / shift.pow(2).sum())

        r = {"layer": i, "probe_acc": accs[0], "cos_probe_meandiff": float(read @ md / md.norm()),
             "shift_share_probe": share(read), "shift_share_pattern": share(pattern), "shift_share_meandiff": share(md),
             "cos_pattern_meandiff": float(pattern @ md / pattern.norm() / md.norm())}
        out.append(r)
        rows.append([i, f"{r['probe_acc']:.3f}", f"{r['cos_probe_meandiff']:+.3f}", f"{r['cos_pattern_meandiff']:+.3f}",
                     f"{r['shift_share_probe']:.4f}", f"{r['shift_share_pattern']:.4f}", f"{r['shift_share_meandiff']:.4f}"])
    print(render(["layer", "probe acc (held out)", "cos(probe, meandiff)", "cos(pattern, meandiff)", "shift share: probe",
                  "pattern", "meandiff"], rows, title=f"probe directions on {recipe.model.id} (mlp_out, outliers = {s.outliers})"))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"recipe": a.recipe, "model": recipe.model.id, "layers": out}, fh, indent=1)


if __name__ == "__main__":
    main()
