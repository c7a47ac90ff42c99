"""credit uses: how each usage event was accounted, so reconcile checks the raw ledger

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-04 20:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table(
        'credit_uses',
        sa.Column('usage_event_id', sa.BigInteger(), nullable=False),
        sa.Column('end_user_id', BigIntPK, nullable=False),
        sa.Column('tokens', sa.BigInteger(), nullable=False),
        sa.Column('credits', sa.BigInteger(), nullable=True),
        sa.Column('allowance', sa.BigInteger(), nullable=True),
        sa.Column('uncharged', sa.BigInteger(), nullable=True),
        sa.Column('happened_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'],
                                name=op.f('fk_credit_uses_end_user_id_end_users')),
        sa.PrimaryKeyConstraint('usage_event_id', name=op.f('pk_credit_uses')),
    )
    op.create_index('ix_credit_uses_user', 'credit_uses', ['end_user_id', 'happened_at'])
    # Events accounted before: their split is not known, only that they were accounted.
    op.execute("INSERT INTO credit_uses (usage_event_id, end_user_id, tokens, happened_at) "
               "SELECT id, end_user_id, input_tokens + output_tokens, created_at "
               "FROM usage_events WHERE plan_id IS NOT NULL AND NOT credits_pending")


def downgrade() -> None:
    op.drop_index('ix_credit_uses_user', table_name='credit_uses')
    op.drop_table('credit_uses')
