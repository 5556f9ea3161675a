"""Evaluation: task metrics on held-out rows, base vs tuned.

``tuneforge.evaluate(target, **options)`` calls ``tuneforge.api.evaluate`` (see tuneforge/__init__.py)."""
