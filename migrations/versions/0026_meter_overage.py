"""Allowances and overage of [[meters]] meters: each cycle's use, and the overage to Stripe

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-06 14:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0026'
down_revision = '0025'
branch_labels = None
depends_on = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table(
        'meter_overages',
        sa.Column('meter_event_id', sa.BigInteger(), nullable=False),
        sa.Column('app_id', sa.Integer(), nullable=False),
        sa.Column('end_user_id', BigIntPK, nullable=False),
        sa.Column('meter_id', sa.String(length=64), nullable=False),
        sa.Column('plan_id', sa.String(length=64), nullable=False),
        sa.Column('plan_version', sa.Integer(), nullable=False),
        sa.Column('units_micro', sa.BigInteger(), nullable=False),
        sa.Column('price_minor', sa.String(length=40), nullable=False),
        sa.Column('currency', sa.String(length=3), nullable=False),
        sa.Column('happened_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('reported_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('report_attempted_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('report_error', sa.String(length=500), nullable=True),
        sa.ForeignKeyConstraint(['app_id'], ['apps.id'],
                                name=op.f('fk_meter_overages_app_id_apps')),
        sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'],
                                name=op.f('fk_meter_overages_end_user_id_end_users')),
        sa.PrimaryKeyConstraint('meter_event_id', name=op.f('pk_meter_overages')),
    )
    op.create_index('ix_meter_overages_user_happened', 'meter_overages',
                    ['end_user_id', 'happened_at'])
    op.create_table(
        'meter_cycle_uses',
        sa.Column('end_user_id', BigIntPK, nullable=False),
        sa.Column('meter_id', sa.String(length=64), nullable=False),
        sa.Column('cycle_start', sa.DateTime(timezone=True), nullable=False),
        sa.Column('used_micro', sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'],
                                name=op.f('fk_meter_cycle_uses_end_user_id_end_users')),
        sa.PrimaryKeyConstraint('end_user_id', 'meter_id', 'cycle_start',
                                name=op.f('pk_meter_cycle_uses')),
    )


def downgrade() -> None:
    op.drop_table('meter_cycle_uses')
    op.drop_index('ix_meter_overages_user_happened', table_name='meter_overages')
    op.drop_table('meter_overages')
