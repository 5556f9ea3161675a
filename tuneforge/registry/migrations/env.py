"""alembic environment for the registry database (tables of tuneforge.registry.store.Base).

Registry() upgrades every database it opens to head, so users never run alembic by hand.
To add a revision after changing a table or adding one to ``Base`` (from the repo root):

    python -m tuneforge.registry.migrate revision "add jobs table"   # autogenerate against a scratch DB

then read the generated file under migrations/versions/ (autogenerate misses renames and
server defaults) and run the migration test (tests/unit/registry/test_registry_migrations.py).
"""

from alembic import context
from sqlalchemy import create_engine

from tuneforge.registry.migrate import all_tables

config = context.config
target_metadata = all_tables()


def run() -> None:
    # Registry passes its open connection; the revision command passes a URL.
    connection = config.attributes.get("connection")
    if connection is None:
        with create_engine(config.get_main_option("sqlalchemy.url")).begin() as connection:
            _migrate(connection)
    else:
        _migrate(connection)


def _migrate(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table instead.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


run()
