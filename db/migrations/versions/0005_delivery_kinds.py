"""delivery kinds: a delivery is one object (SR or HL7 message) of a result to one destination

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 13:30:00

- ``deliveries.kind``: ``sr`` (the DICOM SR by C-STORE) or ``hl7`` (an ORU^R01 over
  MLLP); existing rows are SR deliveries.
- ``deliveries.message_control_id``: MSH-10 of an HL7 message, unique; NULL for SRs.
- The unique constraint becomes (result_id, destination, kind): an SR destination and
  an HL7 destination may share a name.
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('deliveries') as batch:
        batch.add_column(sa.Column(
            'kind', sa.Enum('sr', 'hl7', name='deliverykind', native_enum=False, length=32),
            nullable=False, server_default='sr'))
        batch.add_column(sa.Column('message_control_id', sa.String(length=20), nullable=True))
        batch.drop_constraint('uq_deliveries_result_id_destination', type_='unique')
        batch.create_unique_constraint('uq_deliveries_result_id_destination_kind',
                                       ['result_id', 'destination', 'kind'])
        batch.create_unique_constraint('uq_deliveries_message_control_id',
                                       ['message_control_id'])


def downgrade() -> None:
    op.execute("DELETE FROM deliveries WHERE kind <> 'sr'")
    with op.batch_alter_table('deliveries') as batch:
        batch.drop_constraint('uq_deliveries_message_control_id', type_='unique')
        batch.drop_constraint('uq_deliveries_result_id_destination_kind', type_='unique')
        batch.create_unique_constraint('uq_deliveries_result_id_destination',
                                       ['result_id', 'destination'])
        batch.drop_column('message_control_id')
        batch.drop_column('kind')
