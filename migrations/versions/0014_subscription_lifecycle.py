"""acknowledgments, notices, price changes, withdrawals, German cancel declarations

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30 05:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def _id() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False)


def _user() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column('end_user_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
                     nullable=False)


def _fks(table: str, user: bool = True) -> list[sa.ForeignKeyConstraint]:
    fks = [sa.ForeignKeyConstraint(['app_id'], ['apps.id'], name=op.f(f'fk_{table}_app_id_apps'))]
    if user:
        fks.append(sa.ForeignKeyConstraint(['end_user_id'], ['end_users.id'],
                                           name=op.f(f'fk_{table}_end_user_id_end_users')))
    return fks


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    s = sa.String
    op.create_table(
        'acknowledgments', _id(),
        sa.Column('ack_id', s(length=40), nullable=False),
        sa.Column('app_id', sa.Integer(), nullable=False), _user(),
        sa.Column('checkout_session_id', s(length=255), nullable=False),
        sa.Column('subscription_id', s(length=255), nullable=True),
        sa.Column('consent_id', s(length=40), nullable=True),
        sa.Column('plan', s(length=80), nullable=False),
        sa.Column('jurisdiction', s(length=16), nullable=False),
        sa.Column('locale', s(length=16), nullable=False),
        sa.Column('email_sha256', s(length=64), nullable=True),
        sa.Column('started_at', ts, nullable=False),
        sa.Column('withdrawal_deadline', ts, nullable=True),
        sa.Column('content', sa.Text(), nullable=False),
        sa.Column('event_id', s(length=40), nullable=False),
        sa.Column('created_at', ts, nullable=False),
        sa.Column('retain_until', ts, nullable=False),
        *_fks('acknowledgments'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_acknowledgments')),
        sa.UniqueConstraint('ack_id', name=op.f('uq_acknowledgments_ack_id')),
        sa.UniqueConstraint('checkout_session_id',
                            name=op.f('uq_acknowledgments_checkout_session_id')),
    )
    op.create_index('ix_acknowledgments_app_user', 'acknowledgments', ['app_id', 'end_user_id'])
    op.create_index(op.f('ix_acknowledgments_subscription_id'), 'acknowledgments',
                    ['subscription_id'])
    op.create_table(
        'notices', _id(),
        sa.Column('notice_id', s(length=40), nullable=False),
        sa.Column('app_id', sa.Integer(), nullable=False), _user(),
        sa.Column('subscription_id', s(length=255), nullable=False),
        sa.Column('notice_type', s(length=24), nullable=False),
        sa.Column('occasion', s(length=80), nullable=False),
        sa.Column('event_at', ts, nullable=False),
        sa.Column('jurisdiction', s(length=16), nullable=False),
        sa.Column('window', s(length=80), nullable=False),
        sa.Column('sent_at', ts, nullable=False),
        sa.Column('on_time', sa.Boolean(), nullable=False),
        sa.Column('content', sa.Text(), nullable=False),
        sa.Column('event_id', s(length=40), nullable=False),
        sa.Column('retain_until', ts, nullable=False),
        *_fks('notices'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_notices')),
        sa.UniqueConstraint('notice_id', name=op.f('uq_notices_notice_id')),
        sa.UniqueConstraint('subscription_id', 'notice_type', 'occasion',
                            name=op.f('uq_notices_subscription_id')),
    )
    op.create_index(op.f('ix_notices_app_id'), 'notices', ['app_id'])
    op.create_table(
        'price_changes', _id(),
        sa.Column('change_id', s(length=40), nullable=False),
        sa.Column('plan_id', s(length=64), nullable=False),
        sa.Column('from_version', sa.Integer(), nullable=False),
        sa.Column('to_version', sa.Integer(), nullable=False),
        sa.Column('effective_at', ts, nullable=False),
        sa.Column('created_at', ts, nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_price_changes')),
        sa.UniqueConstraint('change_id', name=op.f('uq_price_changes_change_id')),
    )
    op.create_table(
        'withdrawals', _id(),
        sa.Column('withdrawal_id', s(length=40), nullable=False),
        sa.Column('app_id', sa.Integer(), nullable=False), _user(),
        sa.Column('subscription_id', s(length=255), nullable=False),
        sa.Column('requested_at', ts, nullable=False),
        sa.Column('deadline', ts, nullable=False),
        sa.Column('early_start', sa.Boolean(), nullable=False),
        sa.Column('days_used', sa.Integer(), nullable=False),
        sa.Column('term_days', sa.Integer(), nullable=False),
        sa.Column('paid', sa.BigInteger(), nullable=False),
        sa.Column('refund', sa.BigInteger(), nullable=False),
        sa.Column('currency', s(length=3), nullable=False),
        sa.Column('refund_ref', s(length=255), nullable=True),
        sa.Column('event_id', s(length=40), nullable=False),
        sa.Column('retain_until', ts, nullable=False),
        *_fks('withdrawals'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_withdrawals')),
        sa.UniqueConstraint('withdrawal_id', name=op.f('uq_withdrawals_withdrawal_id')),
        sa.UniqueConstraint('subscription_id', name=op.f('uq_withdrawals_subscription_id')),
    )
    op.create_table(
        'cancel_declarations', _id(),
        sa.Column('declaration_id', s(length=40), nullable=False),
        sa.Column('app_id', sa.Integer(), nullable=False),
        sa.Column('received_at', ts, nullable=False),
        sa.Column('name', s(length=200), nullable=False),
        sa.Column('email_sha256', s(length=64), nullable=False),
        sa.Column('contract_ref', s(length=255), nullable=False),
        sa.Column('kind', s(length=16), nullable=False),
        sa.Column('reason', s(length=1000), nullable=True),
        sa.Column('subscription_id', s(length=255), nullable=True),
        sa.Column('cancellation_id', s(length=40), nullable=True),
        sa.Column('event_id', s(length=40), nullable=False),
        sa.Column('retain_until', ts, nullable=False),
        *_fks('cancel_declarations', user=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_cancel_declarations')),
        sa.UniqueConstraint('declaration_id', name=op.f('uq_cancel_declarations_declaration_id')),
    )
    op.create_index(op.f('ix_cancel_declarations_app_id'), 'cancel_declarations', ['app_id'])


def downgrade() -> None:
    for table in ('cancel_declarations', 'withdrawals', 'price_changes', 'notices',
                  'acknowledgments'):
        op.drop_table(table)
