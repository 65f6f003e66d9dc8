"""Edits (pure data with a weight face and a hook face) and the Patch that orders them."""
