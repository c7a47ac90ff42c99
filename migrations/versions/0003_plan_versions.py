"""plan versions: the version an end user is on, and the versions that were published

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 23:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('end_user_plans', schema=None) as batch_op:
        batch_op.add_column(sa.Column('plan_version', sa.Integer(), nullable=True))
    op.create_table('plan_versions',
    sa.Column('plan_id', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('content', sa.Text(), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('plan_id', 'version', name=op.f('pk_plan_versions'))
    )


def downgrade() -> None:
    op.drop_table('plan_versions')
    with op.batch_alter_table('end_user_plans', schema=None) as batch_op:
        batch_op.drop_column('plan_version')
