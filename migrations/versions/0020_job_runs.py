"""scheduled jobs: each job's state and its recent runs (meterlane worker); the overage's
first send attempt, so a send older than Stripe's de-duplication window is checked first

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-06 11:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table(
        'job_states',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('interval_seconds', sa.Integer(), nullable=False),
        sa.Column('next_run_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_outcome', sa.String(length=16), nullable=True),
        sa.Column('last_error', sa.String(length=500), nullable=True),
        sa.Column('last_success_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_duration_ms', sa.BigInteger(), nullable=True),
        sa.Column('runs_ok', sa.BigInteger(), nullable=False),
        sa.Column('runs_error', sa.BigInteger(), nullable=False),
        sa.Column('runs_lost', sa.BigInteger(), nullable=False),
        sa.Column('running_on', sa.String(length=200), nullable=True),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('scheduled', sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_job_states')),
    )
    op.create_table(
        'job_runs',
        sa.Column('id', BigIntPK, nullable=False),
        sa.Column('job', sa.String(length=64), nullable=False),
        sa.Column('worker', sa.String(length=200), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('outcome', sa.String(length=16), nullable=False),
        sa.Column('message', sa.String(length=500), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_job_runs')),
    )
    op.create_index('ix_job_runs_job', 'job_runs', ['job', 'id'])
    with op.batch_alter_table('credit_overages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('report_attempted_at', sa.DateTime(timezone=True),
                                      nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('credit_overages', schema=None) as batch_op:
        batch_op.drop_column('report_attempted_at')
    op.drop_index('ix_job_runs_job', table_name='job_runs')
    op.drop_table('job_runs')
    op.drop_table('job_states')
