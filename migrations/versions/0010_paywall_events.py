"""paywall events, the outbox and webhook deliveries

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    big = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
    op.create_table(
        'webhook_endpoints',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('app_id', sa.Integer(), nullable=False),
        sa.Column('url', sa.String(length=2000), nullable=False),
        sa.Column('secret', sa.String(length=100), nullable=False),
        sa.Column('created_at', ts, nullable=False),
        sa.ForeignKeyConstraint(['app_id'], ['apps.id'],
                                name=op.f('fk_webhook_endpoints_app_id_apps')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_endpoints')),
        sa.UniqueConstraint('app_id', name=op.f('uq_webhook_endpoints_app_id')),
    )
    op.create_table(
        'outbox_events',
        sa.Column('id', big, nullable=False),
        sa.Column('event_id', sa.String(length=40), nullable=False),
        sa.Column('app_id', sa.Integer(), nullable=False),
        sa.Column('type', sa.String(length=64), nullable=False),
        sa.Column('body', sa.Text(), nullable=False),
        sa.Column('created_at', ts, nullable=False),
        sa.ForeignKeyConstraint(['app_id'], ['apps.id'],
                                name=op.f('fk_outbox_events_app_id_apps')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox_events')),
        sa.UniqueConstraint('event_id', name=op.f('uq_outbox_events_event_id')),
    )
    op.create_index('ix_outbox_events_app_created', 'outbox_events', ['app_id', 'created_at'])
    op.create_table(
        'webhook_deliveries',
        sa.Column('id', big, nullable=False),
        sa.Column('event_id', sa.String(length=40), nullable=False),
        sa.Column('endpoint_id', sa.Integer(), nullable=False),
        sa.Column('app_id', sa.Integer(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', ts, nullable=False),
        sa.Column('last_status', sa.Integer(), nullable=True),
        sa.Column('last_error', sa.String(length=500), nullable=True),
        sa.Column('delivered_at', ts, nullable=True),
        sa.Column('created_at', ts, nullable=False),
        sa.ForeignKeyConstraint(['app_id'], ['apps.id'],
                                name=op.f('fk_webhook_deliveries_app_id_apps')),
        sa.ForeignKeyConstraint(['endpoint_id'], ['webhook_endpoints.id'],
                                name=op.f('fk_webhook_deliveries_endpoint_id_webhook_endpoints')),
        sa.ForeignKeyConstraint(['event_id'], ['outbox_events.event_id'],
                                name=op.f('fk_webhook_deliveries_event_id_outbox_events')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries')),
    )
    op.create_index('ix_webhook_deliveries_due', 'webhook_deliveries',
                    ['state', 'next_attempt_at'])
    op.create_index('ix_webhook_deliveries_app', 'webhook_deliveries', ['app_id', 'id'])
    op.create_table(
        'webhook_attempts',
        sa.Column('id', big, nullable=False),
        sa.Column('delivery_id', big, nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('at', ts, nullable=False),
        sa.Column('status', sa.Integer(), nullable=True),
        sa.Column('error', sa.String(length=500), nullable=True),
        sa.Column('duration_ms', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['delivery_id'], ['webhook_deliveries.id'],
                                name=op.f('fk_webhook_attempts_delivery_id_webhook_deliveries')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_attempts')),
    )
    op.create_index(op.f('ix_webhook_attempts_delivery_id'), 'webhook_attempts',
                    ['delivery_id'])
    op.create_table(
        'paywall_events',
        sa.Column('id', big, nullable=False),
        sa.Column('event_id', sa.String(length=40), nullable=False),
        sa.Column('app_id', sa.Integer(), nullable=False),
        sa.Column('end_user_id', big, nullable=False),
        sa.Column('trigger', sa.String(length=24), nullable=False),
        sa.Column('threshold', sa.Integer(), nullable=True),
        sa.Column('limit_id', sa.String(length=80), nullable=False),
        sa.Column('used', sa.BigInteger(), nullable=False),
        sa.Column('amount', sa.BigInteger(), nullable=False),
        sa.Column('resets_at', ts, nullable=True),
        sa.Column('plan_id', sa.String(length=64), nullable=False),
        sa.Column('plan_version', sa.Integer(), nullable=False),
        sa.Column('dedupe_key', sa.String(length=300), nullable=False),
        sa.Column('body', sa.Text(), nullable=False),
        sa.Column('created_at', ts, nullable=False),
        sa.ForeignKeyConstraint(['app_id'], ['apps.id'],
                                name=op.f('fk_paywall_events_app_id_apps')),
        sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'],
                                name=op.f('fk_paywall_events_end_user_id_end_users')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_paywall_events')),
        sa.UniqueConstraint('event_id', name=op.f('uq_paywall_events_event_id')),
        sa.UniqueConstraint('dedupe_key', name=op.f('uq_paywall_events_dedupe_key')),
    )
    op.create_index('ix_paywall_events_app_user_created', 'paywall_events',
                    ['app_id', 'end_user_id', 'created_at'])


def downgrade() -> None:
    op.drop_table('paywall_events')
    op.drop_table('webhook_attempts')
    op.drop_table('webhook_deliveries')
    op.drop_table('outbox_events')
    op.drop_table('webhook_endpoints')
