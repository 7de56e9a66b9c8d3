"""Alembic's entry point, run by `batchscore.storage.schema.migrate` on the connection (and
inside the transaction, under the lock) it hands over; there is no alembic.ini."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
