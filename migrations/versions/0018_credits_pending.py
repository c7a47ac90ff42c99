"""credits pending: usage not yet accounted is marked, so a late commit is never skipped

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-04 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('usage_events') as batch:
        batch.add_column(sa.Column('credits_pending', sa.Boolean(), server_default='0',
                                   nullable=False))
    # what the id cursor had not reached yet is pending; what it passed is taken as accounted
    op.execute("UPDATE usage_events SET credits_pending = true WHERE plan_id IS NOT NULL AND "
               "id > COALESCE((SELECT c.last_event_id FROM credit_cursors c "
               "WHERE c.end_user_id = usage_events.end_user_id), 0)")
    op.create_index('ix_usage_events_credits_pending', 'usage_events', ['end_user_id', 'id'],
                    postgresql_where=sa.text('credits_pending'),
                    sqlite_where=sa.text('credits_pending'))


def downgrade() -> None:
    op.drop_index('ix_usage_events_credits_pending', table_name='usage_events')
    with op.batch_alter_table('usage_events') as batch:
        batch.drop_column('credits_pending')
