"""cancellation records

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30 04:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        'cancellation_records',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('cancellation_id', sa.String(length=40), nullable=False),
        sa.Column('app_id', sa.Integer(), nullable=False),
        sa.Column('end_user_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
                  nullable=False),
        sa.Column('subscription_id', sa.String(length=255), nullable=False),
        sa.Column('plan', sa.String(length=80), nullable=False),
        sa.Column('mode', sa.String(length=24), nullable=False),
        sa.Column('channel', sa.String(length=32), nullable=False),
        sa.Column('steps_count', sa.Integer(), nullable=False),
        sa.Column('requested_at', ts, nullable=False),
        sa.Column('effective_at', ts, nullable=True),
        sa.Column('confirmation_event_id', sa.String(length=40), nullable=False),
        sa.Column('retain_until', ts, nullable=False),
        sa.ForeignKeyConstraint(['app_id'], ['apps.id'],
                                name=op.f('fk_cancellation_records_app_id_apps')),
        sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'],
                                name=op.f('fk_cancellation_records_end_user_id_end_users')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_cancellation_records')),
        sa.UniqueConstraint('cancellation_id',
                            name=op.f('uq_cancellation_records_cancellation_id')),
    )
    op.create_index(op.f('ix_cancellation_records_subscription_id'), 'cancellation_records',
                    ['subscription_id'])


def downgrade() -> None:
    op.drop_table('cancellation_records')
