"""Data: labelled toxic / non-toxic sets, contrastive pairs, prompt sets, and where they come from."""
