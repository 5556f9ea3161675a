"""Deployment: export (merge/fold), serving and routing."""
