"""ledger quarantine: records the database refused, kept with their reason; usage notes

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-04 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        'ledger_quarantine',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('created_at', ts, nullable=False),
        sa.Column('source', sa.String(length=16), nullable=False),
        sa.Column('reason', sa.String(length=500), nullable=False),
        sa.Column('request_id', sa.String(length=40), nullable=True),
        sa.Column('payload', sa.Text(), nullable=False),
        sa.Column('resolved_at', ts, nullable=True),
        sa.Column('resolution', sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_quarantine')),
    )
    op.create_index('ix_ledger_quarantine_resolved', 'ledger_quarantine', ['resolved_at'])
    with op.batch_alter_table('usage_events') as batch:
        batch.add_column(sa.Column('usage_note', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('usage_events') as batch:
        batch.drop_column('usage_note')
    op.drop_index('ix_ledger_quarantine_resolved', table_name='ledger_quarantine')
    op.drop_table('ledger_quarantine')
