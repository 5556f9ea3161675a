"""The registry: an index over run folders (versions, aliases with history, API keys)."""
