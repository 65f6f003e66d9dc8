"""Workflows: the run plan, run, compute, sweep, tune, localize, plan. The only layer that wires the others together."""
