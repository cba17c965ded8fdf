"""Alembic environment for the ledger: run in-process by `wan_pipeline.ledger.database.upgrade`.

The connection (with its PostgreSQL schema, if any) is handed over in `config.attributes`; there is
no alembic.ini and no URL here, so a migration can never run against a database by accident.
"""

from alembic import context

from wan_pipeline.ledger.database import VERSION_TABLE
from wan_pipeline.ledger.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    version_table_schema=context.config.attributes.get("schema"),
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations()
