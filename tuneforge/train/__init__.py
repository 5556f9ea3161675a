"""Training: the one train entry (run.py) and what it stands on.

``tuneforge.train(config, **overrides)`` calls ``tuneforge.api.train`` (see tuneforge/__init__.py)."""
