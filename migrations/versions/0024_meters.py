"""[[meters]]: meter events, and room for a meter's id in limit refusals

Revision ID: 0024
Revises: 0022
Create Date: 2026-12-06 12:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0024'
down_revision = '0022'
branch_labels = None
depends_on = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table(
        'meter_events',
        sa.Column('id', BigIntPK, nullable=False),
        sa.Column('app_id', sa.Integer(), nullable=False),
        sa.Column('end_user_id', BigIntPK, nullable=False),
        sa.Column('meter_id', sa.String(length=64), nullable=False),
        sa.Column('idempotency_key', sa.String(length=300), nullable=False),
        sa.Column('value_micro', sa.BigInteger(), nullable=False),
        sa.Column('unique_key', sa.String(length=300), nullable=True),
        sa.Column('cost_pico_usd', sa.BigInteger(), nullable=True),
        sa.Column('plan_id', sa.String(length=64), nullable=True),
        sa.Column('data', sa.Text(), nullable=True),
        sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['app_id'], ['apps.id'],
                                name=op.f('fk_meter_events_app_id_apps')),
        sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'],
                                name=op.f('fk_meter_events_end_user_id_end_users')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_meter_events')),
        sa.UniqueConstraint('app_id', 'idempotency_key',
                            name=op.f('uq_meter_events_app_id')),
    )
    op.create_index('ix_meter_events_app_user_meter_occurred', 'meter_events',
                    ['app_id', 'end_user_id', 'meter_id', 'occurred_at'])
    op.create_index('ix_meter_events_received', 'meter_events', ['received_at'])
    op.create_table(
        'meter_price_versions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('meter_id', sa.String(length=64), nullable=False),
        sa.Column('effective_from', sa.DateTime(timezone=True), nullable=False),
        sa.Column('price_pico_per_unit', sa.BigInteger(), nullable=False),
        sa.Column('source', sa.String(length=200), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_meter_price_versions')),
        sa.UniqueConstraint('meter_id', 'effective_from',
                            name=op.f('uq_meter_price_versions_meter_id')),
    )
    with op.batch_alter_table('limit_refusals') as batch:
        batch.alter_column('metric', type_=sa.String(length=80),
                           existing_type=sa.String(length=16), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table('limit_refusals') as batch:
        batch.alter_column('metric', type_=sa.String(length=16),
                           existing_type=sa.String(length=80), existing_nullable=False)
    op.drop_table('meter_price_versions')
    op.drop_index('ix_meter_events_received', table_name='meter_events')
    op.drop_index('ix_meter_events_app_user_meter_occurred', table_name='meter_events')
    op.drop_table('meter_events')
