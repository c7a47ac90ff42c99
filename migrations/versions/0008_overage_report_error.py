"""overage: why Stripe refused a meter event

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 00:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('credit_overages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('report_error', sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('credit_overages', schema=None) as batch_op:
        batch_op.drop_column('report_error')
