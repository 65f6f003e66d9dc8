"""Baking a Patch into a checkpoint, and verifying a baked output against its record."""
