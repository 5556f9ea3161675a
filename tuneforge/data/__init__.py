"""Dataset preparation: read, validate, convert to canonical rows, render, split."""
