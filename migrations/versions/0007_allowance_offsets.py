"""allowance offsets: usage an upgrade does not carry over

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 23:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('allowance_offsets',
    sa.Column('end_user_id', BigIntPK, nullable=False),
    sa.Column('cycle_start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('credits', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'], name=op.f('fk_allowance_offsets_end_user_id_end_users')),
    sa.PrimaryKeyConstraint('end_user_id', 'cycle_start', name=op.f('pk_allowance_offsets'))
    )


def downgrade() -> None:
    op.drop_table('allowance_offsets')
