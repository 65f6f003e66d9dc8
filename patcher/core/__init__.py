"""Models and devices, the architecture map, the embedded models, and small shared tools (errors, hooks, registries, tables): the layer every other one builds on."""
