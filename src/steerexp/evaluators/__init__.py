"""Evaluators: paired samples (baseline vs edited, same prompts and seeds) -> metrics."""
