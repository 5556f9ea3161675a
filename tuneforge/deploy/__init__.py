"""Deployment: export (merged, GGUF, int8), the OpenAI-compatible server, routing, engines."""
