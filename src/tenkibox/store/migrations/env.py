"""Alembic environment: run against the connection handed in by ``tenkibox.store.db``."""

from alembic import context

from tenkibox.store.tables import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
