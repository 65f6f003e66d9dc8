"""Files: safetensors checkpoints read and written, output folders that appear atomically, where a model's files come from, and the patch.json record."""
