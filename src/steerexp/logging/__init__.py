"""Run logging: W&B (offline under the run directory unless asked) + the same on disk."""
