"""Training: the one train entry (run.py) and what it stands on."""
