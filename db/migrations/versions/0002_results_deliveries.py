"""results and deliveries; job retry time

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 07:35:37.228957
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('results',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('study_revision', sa.Integer(), nullable=False),
    sa.Column('model_name', sa.String(length=64), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('model_validated', sa.Boolean(), nullable=False),
    sa.Column('probability', sa.Double(), nullable=True),
    sa.Column('decision', sa.Boolean(), nullable=True),
    sa.Column('threshold', sa.Double(), nullable=False),
    sa.Column('priority', sa.String(length=32), nullable=False),
    sa.Column('sr_sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sr_series_uid', sa.String(length=64), nullable=False),
    sa.Column('sr_path', sa.String(length=255), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_results_job_id_jobs')),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_results_study_id_studies')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_results')),
    sa.UniqueConstraint('job_id', name=op.f('uq_results_job_id')),
    sa.UniqueConstraint('sr_sop_instance_uid', name=op.f('uq_results_sr_sop_instance_uid'))
    )
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_results_priority'), ['priority'], unique=False)
        batch_op.create_index(batch_op.f('ix_results_study_id'), ['study_id'], unique=False)

    op.create_table('deliveries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('result_id', sa.Integer(), nullable=False),
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('state', sa.Enum('pending', 'delivered', 'failed', name='deliverystate', native_enum=False, length=32), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(), nullable=False),
    sa.Column('last_reason', sa.String(length=64), nullable=True),
    sa.Column('last_detail', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('delivered_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['result_id'], ['results.id'], name=op.f('fk_deliveries_result_id_results')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deliveries')),
    sa.UniqueConstraint('result_id', 'destination', name=op.f('uq_deliveries_result_id_destination'))
    )
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deliveries_next_attempt_at'), ['next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_deliveries_result_id'), ['result_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_deliveries_state'), ['state'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('next_attempt_at', sa.DateTime(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('next_attempt_at')

    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deliveries_state'))
        batch_op.drop_index(batch_op.f('ix_deliveries_result_id'))
        batch_op.drop_index(batch_op.f('ix_deliveries_next_attempt_at'))

    op.drop_table('deliveries')
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_results_study_id'))
        batch_op.drop_index(batch_op.f('ix_results_priority'))

    op.drop_table('results')
