"""Evaluation: generation, toxicity evaluators, metrics, perplexity, reports and plots."""
