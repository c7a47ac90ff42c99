"""billing: Stripe events, customers, subscriptions, revenue facts

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 23:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('stripe_events',
    sa.Column('id', sa.String(length=100), nullable=False),
    sa.Column('type', sa.String(length=100), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('handled_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.String(length=500), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stripe_events'))
    )
    op.create_table('stripe_customers',
    sa.Column('customer_id', sa.String(length=100), nullable=False),
    sa.Column('app_id', sa.Integer(), nullable=False),
    sa.Column('end_user_id', BigIntPK, nullable=False),
    sa.ForeignKeyConstraint(['app_id'], ['apps.id'], name=op.f('fk_stripe_customers_app_id_apps')),
    sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'], name=op.f('fk_stripe_customers_end_user_id_end_users')),
    sa.PrimaryKeyConstraint('customer_id', name=op.f('pk_stripe_customers')),
    sa.UniqueConstraint('end_user_id', name=op.f('uq_stripe_customers_end_user_id'))
    )
    op.create_table('subscriptions',
    sa.Column('id', sa.String(length=100), nullable=False),
    sa.Column('app_id', sa.Integer(), nullable=False),
    sa.Column('end_user_id', BigIntPK, nullable=False),
    sa.Column('plan_id', sa.String(length=64), nullable=False),
    sa.Column('plan_version', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('billing_anchor', sa.DateTime(timezone=True), nullable=False),
    sa.Column('current_period_start', sa.DateTime(timezone=True), nullable=True),
    sa.Column('current_period_end', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cancel_at_period_end', sa.Boolean(), nullable=False),
    sa.Column('trial_end', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_event_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['app_id'], ['apps.id'], name=op.f('fk_subscriptions_app_id_apps')),
    sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'], name=op.f('fk_subscriptions_end_user_id_end_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subscriptions'))
    )
    op.create_index(op.f('ix_subscriptions_end_user_id'), 'subscriptions', ['end_user_id'], unique=False)
    op.create_table('revenue_events',
    sa.Column('id', BigIntPK, nullable=False),
    sa.Column('source_id', sa.String(length=100), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('app_id', sa.Integer(), nullable=False),
    sa.Column('end_user_id', BigIntPK, nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('period_start', sa.DateTime(timezone=True), nullable=True),
    sa.Column('period_end', sa.DateTime(timezone=True), nullable=True),
    sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['app_id'], ['apps.id'], name=op.f('fk_revenue_events_app_id_apps')),
    sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'], name=op.f('fk_revenue_events_end_user_id_end_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_revenue_events')),
    sa.UniqueConstraint('source_id', 'kind', name=op.f('uq_revenue_events_source_id'))
    )
    op.create_index('ix_revenue_events_app_occurred', 'revenue_events', ['app_id', 'occurred_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_revenue_events_app_occurred', table_name='revenue_events')
    op.drop_table('revenue_events')
    op.drop_index(op.f('ix_subscriptions_end_user_id'), table_name='subscriptions')
    op.drop_table('subscriptions')
    op.drop_table('stripe_customers')
    op.drop_table('stripe_events')
