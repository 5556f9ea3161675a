"""The registry: an index over run folders (versions, aliases with history, API keys, route
overrides: store.py) and the registry database's tables (tables.py: also the request log,
feedback, review and fine-tuning jobs that production writes), migrated by alembic
(migrate.py, migrations/)."""
