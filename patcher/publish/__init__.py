"""Publishing a baked output: the model card and the upload to the Hub."""
