"""credits: grants, burns, overage, and how far each end user's usage is accounted

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 23:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('credit_grants',
    sa.Column('id', BigIntPK, nullable=False),
    sa.Column('app_id', sa.Integer(), nullable=False),
    sa.Column('end_user_id', BigIntPK, nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('granted_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('external_id', sa.String(length=200), nullable=False),
    sa.Column('note', sa.String(length=500), nullable=True),
    sa.ForeignKeyConstraint(['app_id'], ['apps.id'], name=op.f('fk_credit_grants_app_id_apps')),
    sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'], name=op.f('fk_credit_grants_end_user_id_end_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_credit_grants')),
    sa.UniqueConstraint('app_id', 'external_id', name=op.f('uq_credit_grants_app_id'))
    )
    op.create_index('ix_credit_grants_user', 'credit_grants', ['end_user_id', 'granted_at'], unique=False)
    op.create_table('credit_burns',
    sa.Column('id', BigIntPK, nullable=False),
    sa.Column('grant_id', BigIntPK, nullable=False),
    sa.Column('end_user_id', BigIntPK, nullable=False),
    sa.Column('usage_event_id', sa.BigInteger(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('burned_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'], name=op.f('fk_credit_burns_end_user_id_end_users')),
    sa.ForeignKeyConstraint(['grant_id'], ['credit_grants.id'], name=op.f('fk_credit_burns_grant_id_credit_grants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_credit_burns')),
    sa.UniqueConstraint('usage_event_id', 'grant_id', name=op.f('uq_credit_burns_usage_event_id'))
    )
    op.create_index(op.f('ix_credit_burns_grant_id'), 'credit_burns', ['grant_id'], unique=False)
    op.create_table('credit_overages',
    sa.Column('usage_event_id', sa.BigInteger(), nullable=False),
    sa.Column('end_user_id', BigIntPK, nullable=False),
    sa.Column('plan_id', sa.String(length=64), nullable=False),
    sa.Column('plan_version', sa.Integer(), nullable=False),
    sa.Column('credits', sa.BigInteger(), nullable=False),
    sa.Column('happened_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'], name=op.f('fk_credit_overages_end_user_id_end_users')),
    sa.PrimaryKeyConstraint('usage_event_id', name=op.f('pk_credit_overages'))
    )
    op.create_index(op.f('ix_credit_overages_end_user_id'), 'credit_overages', ['end_user_id'], unique=False)
    op.create_table('credit_cursors',
    sa.Column('end_user_id', BigIntPK, nullable=False),
    sa.Column('last_event_id', sa.BigInteger(), nullable=False),
    sa.Column('cycle_start', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cycle_used', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'], name=op.f('fk_credit_cursors_end_user_id_end_users')),
    sa.PrimaryKeyConstraint('end_user_id', name=op.f('pk_credit_cursors'))
    )


def downgrade() -> None:
    op.drop_table('credit_cursors')
    op.drop_index(op.f('ix_credit_overages_end_user_id'), table_name='credit_overages')
    op.drop_table('credit_overages')
    op.drop_index(op.f('ix_credit_burns_grant_id'), table_name='credit_burns')
    op.drop_table('credit_burns')
    op.drop_index('ix_credit_grants_user', table_name='credit_grants')
    op.drop_table('credit_grants')
