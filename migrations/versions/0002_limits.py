"""limits: counters and leases of the SQL limit store, refusals, end users' plans

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 22:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    with op.batch_alter_table('usage_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('limits_pending', sa.Boolean(), server_default='0', nullable=False))
        batch_op.create_index('ix_usage_events_limits_pending', ['id'], unique=False, postgresql_where=sa.text('limits_pending'), sqlite_where=sa.text('limits_pending'))
    op.create_table('limit_counters',
    sa.Column('tag', sa.String(length=100), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('slot', sa.BigInteger(), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.Column('ts', sa.BigInteger(), nullable=False),
    sa.Column('expires_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('tag', 'key', 'slot', name=op.f('pk_limit_counters'))
    )
    op.create_table('limit_leases',
    sa.Column('tag', sa.String(length=100), nullable=False),
    sa.Column('id', sa.String(length=300), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('expires_ms', sa.BigInteger(), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('tag', 'id', name=op.f('pk_limit_leases'))
    )
    op.create_index('ix_limit_leases_tag_state_expires', 'limit_leases', ['tag', 'state', 'expires_ms'], unique=False)
    op.create_table('limit_refusals',
    sa.Column('id', BigIntPK, nullable=False),
    sa.Column('app_id', sa.Integer(), nullable=False),
    sa.Column('end_user_id', BigIntPK, nullable=False),
    sa.Column('request_id', sa.String(length=40), nullable=False),
    sa.Column('plan_id', sa.String(length=64), nullable=False),
    sa.Column('limit_id', sa.String(length=80), nullable=False),
    sa.Column('metric', sa.String(length=16), nullable=False),
    sa.Column('window', sa.String(length=40), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('used', sa.BigInteger(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('resets_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['app_id'], ['apps.id'], name=op.f('fk_limit_refusals_app_id_apps')),
    sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'], name=op.f('fk_limit_refusals_end_user_id_end_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_limit_refusals'))
    )
    op.create_index('ix_limit_refusals_app_user_created', 'limit_refusals', ['app_id', 'end_user_id', 'created_at'], unique=False)
    op.create_table('end_user_plans',
    sa.Column('end_user_id', BigIntPK, nullable=False),
    sa.Column('app_id', sa.Integer(), nullable=False),
    sa.Column('plan_id', sa.String(length=64), nullable=False),
    sa.Column('anchored_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['app_id'], ['apps.id'], name=op.f('fk_end_user_plans_app_id_apps')),
    sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'], name=op.f('fk_end_user_plans_end_user_id_end_users')),
    sa.PrimaryKeyConstraint('end_user_id', name=op.f('pk_end_user_plans'))
    )
    op.create_index(op.f('ix_end_user_plans_app_id'), 'end_user_plans', ['app_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_end_user_plans_app_id'), table_name='end_user_plans')
    op.drop_table('end_user_plans')
    op.drop_index('ix_limit_refusals_app_user_created', table_name='limit_refusals')
    op.drop_table('limit_refusals')
    op.drop_index('ix_limit_leases_tag_state_expires', table_name='limit_leases')
    op.drop_table('limit_leases')
    op.drop_table('limit_counters')
    with op.batch_alter_table('usage_events', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_events_limits_pending')
        batch_op.drop_column('limits_pending')
