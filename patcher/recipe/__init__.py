"""Recipes: the settings schema (dataclasses with help text) and the TOML loader."""
