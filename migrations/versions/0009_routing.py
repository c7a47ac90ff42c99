"""usage events: the router's decision and the cost it avoided

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 02:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('usage_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('route_alias', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('route_reason', sa.String(length=500), nullable=True))
        batch_op.add_column(sa.Column('baseline_cost_pico_usd', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('usage_events', schema=None) as batch_op:
        batch_op.drop_column('baseline_cost_pico_usd')
        batch_op.drop_column('route_reason')
        batch_op.drop_column('route_alias')
