"""summary images: a result may carry a summary Secondary Capture, delivered as its own kind

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 16:00:00

- ``results.summary_sop_instance_uid`` (unique) and ``results.summary_path``: the summary
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
    with op.batch_alter_table('results') as batch:
        batch.add_column(sa.Column('summary_sop_instance_uid', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('summary_path', sa.String(length=255), nullable=True))
        batch.create_unique_constraint('uq_results_summary_sop_instance_uid',
                                       ['summary_sop_instance_uid'])


def downgrade() -> None:
    op.execute("DELETE FROM deliveries WHERE kind = 'summary'")
    with op.batch_alter_table('results') as batch:
        batch.drop_constraint('uq_results_summary_sop_instance_uid', type_='unique')
        batch.drop_column('summary_path')
        batch.drop_column('summary_sop_instance_uid')
