"""Baseline: the tables as of the first Alembic release.

Databases made before Alembic (by `create_all` plus `ALTER TABLE ... ADD COLUMN` on every
connection) hold these tables, possibly without the columns added since the first release;
this revision creates what is missing and adds those columns, keeping every row. A fresh
database gets the tables whole. The definitions are frozen here: later schema changes are
new revisions, never edits of this one.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _tables(metadata: sa.MetaData) -> list[sa.Table]:
    training_runs = sa.Table(
        "training_runs",
        metadata,
        sa.Column("run_id", sa.String(200), primary_key=True),
        sa.Column("dataset", sa.String(1000), nullable=False),
        sa.Column("target", sa.String(200)),
        sa.Column("negative_class", sa.String(200), nullable=False),
        sa.Column("positive_class", sa.String(200), nullable=False),
        sa.Column("feature_columns", sa.JSON, nullable=False),
        sa.Column("n_train", sa.Integer, nullable=False),
        sa.Column("n_test", sa.Integer, nullable=False),
        sa.Column("batch_input_uri", sa.String(1000), nullable=False),
        sa.Column("champion", sa.String(50)),
        sa.Column("profile_uri", sa.String(1000)),
        sa.Column("profile_sha256", sa.String(64)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    model_metrics = sa.Table(
        "model_metrics",
        metadata,
        sa.Column(
            "run_id", sa.String(200), sa.ForeignKey("training_runs.run_id"), primary_key=True
        ),
        sa.Column("model", sa.String(50), primary_key=True),
        sa.Column("precision", sa.Float, nullable=False),
        sa.Column("recall", sa.Float, nullable=False),
        sa.Column("f1", sa.Float, nullable=False),
        sa.Column("roc_auc", sa.Float, nullable=False),
        sa.Column("accuracy", sa.Float, nullable=False),
        sa.Column("cv_score", sa.Float, nullable=False),
        sa.Column("best_params", sa.JSON, nullable=False),
        sa.Column("model_uri", sa.String(1000), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("is_champion", sa.Boolean, nullable=False),
        sa.Column("threshold", sa.Float),
    )
    batch_runs = sa.Table(
        "batch_runs",
        metadata,
        sa.Column("run_id", sa.String(200), primary_key=True),
        sa.Column("input_uri", sa.String(1000), nullable=False),
        sa.Column("training_run_id", sa.String(200), nullable=False),
        sa.Column("models", sa.JSON, nullable=False),
        sa.Column("redis_version", sa.String(200), nullable=False),
        sa.Column("rows_scored", sa.Integer, nullable=False),
        sa.Column("keys_written", sa.Integer, nullable=False),
        sa.Column("published", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rows_read", sa.Integer),
        sa.Column("rows_rejected", sa.Integer),
        sa.Column("duplicates", sa.Integer),
        sa.Column("max_drift", sa.Float),
        sa.Column("max_drift_feature", sa.String(1000)),
        sa.Column("gate", sa.String(4000)),
        sa.Column("report", sa.JSON),
    )
    return [training_runs, model_metrics, batch_runs]


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    for table in _tables(sa.MetaData()):
        if not inspector.has_table(table.name):
            table.create(bind)
            continue
        # Made by an earlier release: only nullable columns were ever added since.
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                op.add_column(table.name, sa.Column(column.name, column.type, nullable=True))
