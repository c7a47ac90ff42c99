"""corrections: a ledger row that voids or amends an earlier one (append-only), and the
overage of a corrected event cancelled (with Stripe when it was sent)

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-06 14:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0025'
down_revision = '0024'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('usage_events', sa.Column('supersedes_id', sa.BigInteger(), nullable=True))
    op.add_column('usage_events', sa.Column('correction', sa.String(length=8), nullable=True))
    # an event is corrected at most once: the database holds that rule
    op.create_index('ix_usage_events_supersedes', 'usage_events', ['supersedes_id'],
                    unique=True)
    op.add_column('meter_events', sa.Column('supersedes_id', sa.BigInteger(), nullable=True))
    op.add_column('meter_events', sa.Column('correction', sa.String(length=8), nullable=True))
    op.create_index('ix_meter_events_supersedes', 'meter_events', ['supersedes_id'],
                    unique=True)
    op.add_column('credit_uses', sa.Column('supersedes_id', sa.BigInteger(), nullable=True))
    op.add_column('credit_overages', sa.Column('cancelled_at', sa.DateTime(timezone=True),
                                               nullable=True))
    op.add_column('credit_overages', sa.Column('cancel_sent_at', sa.DateTime(timezone=True),
                                               nullable=True))
    op.add_column('credit_overages', sa.Column('cancel_error', sa.String(length=500),
                                               nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('credit_overages') as batch:
        batch.drop_column('cancel_error')
        batch.drop_column('cancel_sent_at')
        batch.drop_column('cancelled_at')
    with op.batch_alter_table('credit_uses') as batch:
        batch.drop_column('supersedes_id')
    op.drop_index('ix_meter_events_supersedes', table_name='meter_events')
    with op.batch_alter_table('meter_events') as batch:
        batch.drop_column('correction')
        batch.drop_column('supersedes_id')
    op.drop_index('ix_usage_events_supersedes', table_name='usage_events')
    with op.batch_alter_table('usage_events') as batch:
        batch.drop_column('correction')
        batch.drop_column('supersedes_id')
