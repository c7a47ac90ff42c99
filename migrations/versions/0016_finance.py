"""finance: the price catalog, daily usage and revenue roll-ups, GPU hours

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-30 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    big = sa.BigInteger()
    op.create_table(
        'model_prices',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('model', sa.String(length=200), nullable=False),
        sa.Column('effective_from', ts, nullable=False),
        sa.Column('input', big, nullable=False),
        sa.Column('cached_input', big, nullable=True),
        sa.Column('cache_write', big, nullable=True),
        sa.Column('output', big, nullable=False),
        sa.Column('reasoning', big, nullable=True),
        sa.Column('request_fee', big, nullable=True),
        sa.Column('source', sa.String(length=200), nullable=False),
        sa.Column('created_at', ts, nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_model_prices')),
        sa.UniqueConstraint('model', 'effective_from', name=op.f('uq_model_prices_model')),
    )
    tokens = ['calls', 'input_tokens', 'cached_input_tokens', 'cache_write_tokens',
              'output_tokens', 'reasoning_tokens', 'cloud_cost_pico', 'local_cost_pico',
              'shadow_cost_pico', 'unpriced_calls']
    op.create_table(
        'usage_daily',
        sa.Column('app_id', sa.Integer(), nullable=False),
        sa.Column('end_user_id', big, nullable=False),
        sa.Column('plan_id', sa.String(length=64), nullable=False),
        sa.Column('model', sa.String(length=200), nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        *[sa.Column(name, big, nullable=False) for name in tokens],
        sa.ForeignKeyConstraint(['app_id'], ['apps.id'], name=op.f('fk_usage_daily_app_id_apps')),
        sa.PrimaryKeyConstraint('app_id', 'end_user_id', 'plan_id', 'model', 'day',
                                name=op.f('pk_usage_daily')),
    )
    op.create_index('ix_usage_daily_app_day', 'usage_daily', ['app_id', 'day'])
    op.create_table(
        'revenue_daily',
        sa.Column('app_id', sa.Integer(), nullable=False),
        sa.Column('end_user_id', big, nullable=False),
        sa.Column('plan_id', sa.String(length=64), nullable=False),
        sa.Column('currency', sa.String(length=3), nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('amount', big, nullable=False),
        sa.ForeignKeyConstraint(['app_id'], ['apps.id'],
                                name=op.f('fk_revenue_daily_app_id_apps')),
        sa.PrimaryKeyConstraint('app_id', 'end_user_id', 'plan_id', 'currency', 'day',
                                name=op.f('pk_revenue_daily')),
    )
    op.create_index('ix_revenue_daily_app_day', 'revenue_daily', ['app_id', 'day'])
    op.create_table(
        'gpu_hours',
        sa.Column('upstream', sa.String(length=100), nullable=False),
        sa.Column('hour', ts, nullable=False),
        sa.Column('cost_pico', big, nullable=False),
        sa.Column('allocated_pico', big, nullable=False),
        sa.Column('calls', big, nullable=False),
        sa.Column('tokens', big, nullable=False),
        sa.PrimaryKeyConstraint('upstream', 'hour', name=op.f('pk_gpu_hours')),
    )
    op.create_table(
        'rollup_state',
        sa.Column('name', sa.String(length=32), nullable=False),
        sa.Column('last_id', big, nullable=False),
        sa.Column('updated_at', ts, nullable=False),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_rollup_state')),
    )
    with op.batch_alter_table('usage_events') as batch:
        batch.add_column(sa.Column('cache_write_tokens', big, server_default='0',
                                   nullable=False))
        batch.add_column(sa.Column('plan_id', sa.String(length=64), nullable=True))
        batch.create_index('ix_usage_events_created', ['created_at'])
    with op.batch_alter_table('revenue_events') as batch:
        batch.add_column(sa.Column('plan_id', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('revenue_events') as batch:
        batch.drop_column('plan_id')
    with op.batch_alter_table('usage_events') as batch:
        batch.drop_index('ix_usage_events_created')
        batch.drop_column('plan_id')
        batch.drop_column('cache_write_tokens')
    for table in ('rollup_state', 'gpu_hours', 'revenue_daily', 'usage_daily', 'model_prices'):
        op.drop_table(table)
