"""offer versions

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 03:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'offer_versions',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('app_id', sa.Integer(), nullable=False),
        sa.Column('offer_id', sa.String(length=64), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('content', sa.Text(), nullable=False),
        sa.Column('content_hash', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['app_id'], ['apps.id'],
                                name=op.f('fk_offer_versions_app_id_apps')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_offer_versions')),
        sa.UniqueConstraint('app_id', 'offer_id', 'version',
                            name=op.f('uq_offer_versions_app_id')),
    )


def downgrade() -> None:
    op.drop_table('offer_versions')
