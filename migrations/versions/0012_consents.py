"""consent records and their use by a checkout

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30 04:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    big = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
    op.create_table(
        'consent_records',
        sa.Column('id', big, nullable=False),
        sa.Column('consent_id', sa.String(length=40), nullable=False),
        sa.Column('app_id', sa.Integer(), nullable=False),
        sa.Column('end_user_id', big, nullable=False),
        sa.Column('type', sa.String(length=24), nullable=False),
        sa.Column('offer_id', sa.String(length=64), nullable=False),
        sa.Column('offer_version', sa.Integer(), nullable=False),
        sa.Column('content_hash', sa.String(length=64), nullable=False),
        sa.Column('plan_id', sa.String(length=64), nullable=True),
        sa.Column('disclosure_text', sa.Text(), nullable=False),
        sa.Column('disclosure_sha256', sa.String(length=64), nullable=False),
        sa.Column('rendered_price', sa.String(length=64), nullable=False),
        sa.Column('cta_label', sa.String(length=200), nullable=False),
        sa.Column('locale', sa.String(length=16), nullable=False),
        sa.Column('platform', sa.String(length=16), nullable=False),
        sa.Column('jurisdiction', sa.String(length=16), nullable=False),
        sa.Column('render_manifest', sa.Text(), nullable=False),
        sa.Column('ip', sa.String(length=64), nullable=True),
        sa.Column('user_agent', sa.String(length=500), nullable=True),
        sa.Column('captured_at', ts, nullable=False),
        sa.Column('retain_until', ts, nullable=False),
        sa.ForeignKeyConstraint(['app_id'], ['apps.id'],
                                name=op.f('fk_consent_records_app_id_apps')),
        sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'],
                                name=op.f('fk_consent_records_end_user_id_end_users')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_consent_records')),
        sa.UniqueConstraint('consent_id', name=op.f('uq_consent_records_consent_id')),
    )
    op.create_index('ix_consent_records_app_user', 'consent_records', ['app_id', 'end_user_id'])
    op.create_table(
        'consent_uses',
        sa.Column('consent_id', sa.String(length=40), nullable=False),
        sa.Column('checkout_session_id', sa.String(length=255), nullable=True),
        sa.Column('used_at', ts, nullable=False),
        sa.ForeignKeyConstraint(['consent_id'], ['consent_records.consent_id'],
                                name=op.f('fk_consent_uses_consent_id_consent_records')),
        sa.PrimaryKeyConstraint('consent_id', name=op.f('pk_consent_uses')),
    )


def downgrade() -> None:
    op.drop_table('consent_uses')
    op.drop_table('consent_records')
