"""Workflows: run, compute, sweep, localize, plan. The only layer that wires the others together."""
