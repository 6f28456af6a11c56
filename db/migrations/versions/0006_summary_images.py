"""summary images: a result may carry a summary Secondary Capture, delivered as its own kind

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 16:00:00

- ``results.summary_sop_instance_uid`` (a unique index) and ``results.summary_path``: the summary
  image made from the result; NULL for results made before, or when none could be made.
- ``deliveries.kind`` gains ``summary``. The column is a non-native enum (VARCHAR(32)
  without a CHECK constraint), so only the model's list of values changes: nothing to alter.
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN and a unique index, no batch (table copy) on SQLite: copying results
    # would DROP a table that deliveries reference, which foreign keys forbid.
    op.add_column('results', sa.Column('summary_sop_instance_uid', sa.String(length=64),
                                       nullable=True))
    op.add_column('results', sa.Column('summary_path', sa.String(length=255), nullable=True))
    op.create_index('ix_results_summary_sop_instance_uid', 'results',
                    ['summary_sop_instance_uid'], unique=True)


def downgrade() -> None:
    op.execute("DELETE FROM deliveries WHERE kind = 'summary'")
    op.drop_index('ix_results_summary_sop_instance_uid', table_name='results')
    op.drop_column('results', 'summary_path')  # SQLite >= 3.35 drops a column in place
    op.drop_column('results', 'summary_sop_instance_uid')
