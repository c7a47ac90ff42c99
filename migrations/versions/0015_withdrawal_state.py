"""withdrawals resumable (state, refund plan); what came of a German cancel declaration

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-30 05:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('withdrawals') as batch:
        batch.add_column(sa.Column('state', sa.String(length=16), server_default='done',
                                   nullable=False))
        batch.add_column(sa.Column('refund_plan', sa.Text(), server_default='[]',
                                   nullable=False))
    with op.batch_alter_table('cancel_declarations') as batch:
        batch.add_column(sa.Column('outcome', sa.String(length=16), server_default='received',
                                   nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('cancel_declarations') as batch:
        batch.drop_column('outcome')
    with op.batch_alter_table('withdrawals') as batch:
        batch.drop_column('refund_plan')
        batch.drop_column('state')
