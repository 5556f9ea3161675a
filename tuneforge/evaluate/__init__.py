"""Evaluation: task metrics on held-out rows, base vs tuned."""
