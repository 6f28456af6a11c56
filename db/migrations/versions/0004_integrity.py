"""integrity: content hashes and versions of instances, job failure reasons, queue indexes

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 08:00:00

- ``instances.content_hash``: sha256 of the data set bytes as stored (receiver).
- ``instances.version`` / ``superseded_at``: a re-send with other bytes under
  ``receiver.duplicate_policy = "replace_and_rescore"`` is a new row (version n+1)
  beside the old one; the old row gets ``superseded_at``. The SOP Instance UID is
  unique among current rows (partial unique index) and with its version.
- ``jobs.failure_reason``: a short code (``abandoned``, ``inference_error``, ...)
  beside the free-text ``last_error``.
- Indexes so that claims and due-delivery queries never scan whole tables.
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances') as batch:
        batch.add_column(sa.Column('content_hash', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('version', sa.Integer(), nullable=False, server_default='1'))
        batch.add_column(sa.Column('superseded_at', sa.DateTime(), nullable=True))
        batch.drop_constraint('uq_instances_sop_instance_uid', type_='unique')
        batch.create_unique_constraint('uq_instances_sop_instance_uid_version',
                                       ['sop_instance_uid', 'version'])
    op.create_index('ix_instances_current_sop_instance_uid', 'instances', ['sop_instance_uid'],
                    unique=True, sqlite_where=sa.text('superseded_at IS NULL'),
                    postgresql_where=sa.text('superseded_at IS NULL'))
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('failure_reason', sa.String(length=64), nullable=True))
    op.create_index('ix_jobs_state_next_attempt_at', 'jobs', ['state', 'next_attempt_at'])
    op.create_index('ix_jobs_state_lease_expires_at', 'jobs', ['state', 'lease_expires_at'])
    op.create_index('ix_deliveries_state_next_attempt_at', 'deliveries',
                    ['state', 'next_attempt_at'])


def downgrade() -> None:
    op.drop_index('ix_deliveries_state_next_attempt_at', 'deliveries')
    op.drop_index('ix_jobs_state_lease_expires_at', 'jobs')
    op.drop_index('ix_jobs_state_next_attempt_at', 'jobs')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('failure_reason')
    op.drop_index('ix_instances_current_sop_instance_uid', 'instances')
    op.execute("DELETE FROM instances WHERE superseded_at IS NOT NULL")
    with op.batch_alter_table('instances') as batch:
        batch.drop_constraint('uq_instances_sop_instance_uid_version', type_='unique')
        batch.create_unique_constraint('uq_instances_sop_instance_uid', ['sop_instance_uid'])
        batch.drop_column('superseded_at')
        batch.drop_column('version')
        batch.drop_column('content_hash')
