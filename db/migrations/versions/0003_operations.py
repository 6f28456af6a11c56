"""operations: thresholds and inference time on results, purge time on instances

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 09:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('results') as batch:
        batch.add_column(sa.Column('urgent_threshold', sa.Double(), nullable=True))
        batch.add_column(sa.Column('elevated_threshold', sa.Double(), nullable=True))
        batch.add_column(sa.Column('inference_seconds', sa.Double(), nullable=True))
    with op.batch_alter_table('instances') as batch:
        batch.add_column(sa.Column('purged_at', sa.DateTime(), nullable=True))
        batch.create_index('ix_instances_purged_at', ['purged_at'])


def downgrade() -> None:
    with op.batch_alter_table('instances') as batch:
        batch.drop_index('ix_instances_purged_at')
        batch.drop_column('purged_at')
    with op.batch_alter_table('results') as batch:
        batch.drop_column('inference_seconds')
        batch.drop_column('elevated_threshold')
        batch.drop_column('urgent_threshold')
