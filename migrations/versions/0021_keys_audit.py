"""keys over HTTP (description, last use, rotation) and the append-only audit trail

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-06 11:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0021'
down_revision = '0020'
branch_labels = None
depends_on = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')

REFUSED = "audit_events is append-only: its rows are never updated or deleted"

# A row trigger: it refuses UPDATE and DELETE of any row. TRUNCATE (an operator's deliberate
# wipe, and the test suite's clean-up) fires no row trigger.
PG_FUNCTION = f"""
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '{REFUSED} (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$
"""
PG_TRIGGER = ("CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON "
              "audit_events FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()")
SQLITE_TRIGGERS = [
    f"CREATE TRIGGER audit_events_no_{op_} BEFORE {op_.upper()} ON audit_events "
    f"BEGIN SELECT RAISE(ABORT, '{REFUSED}'); END"
    for op_ in ("update", "delete")
]


def upgrade() -> None:
    with op.batch_alter_table('api_keys') as batch:
        batch.add_column(sa.Column('description', sa.String(length=500), nullable=True))
        batch.add_column(sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('rotated_from', sa.Integer(), nullable=True))
        batch.create_foreign_key(op.f('fk_api_keys_rotated_from_api_keys'), 'api_keys',
                                 ['rotated_from'], ['id'])
    op.create_table(
        'audit_events',
        sa.Column('id', BigIntPK, nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('actor_key_id', sa.String(length=32), nullable=True),
        sa.Column('actor_role', sa.String(length=16), nullable=False),
        sa.Column('actor_name', sa.String(length=100), nullable=True),
        sa.Column('app_id', sa.Integer(), nullable=True),
        sa.Column('action', sa.String(length=64), nullable=False),
        sa.Column('target_type', sa.String(length=32), nullable=False),
        sa.Column('target_id', sa.String(length=300), nullable=False),
        sa.Column('before', sa.Text(), nullable=True),
        sa.Column('after', sa.Text(), nullable=True),
        sa.Column('request_id', sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events')),
    )
    op.create_index('ix_audit_events_app_id_id', 'audit_events', ['app_id', 'id'])
    op.create_index('ix_audit_events_action_id', 'audit_events', ['action', 'id'])
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(PG_FUNCTION)
        op.execute(PG_TRIGGER)
    else:
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("DROP TRIGGER audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION audit_events_append_only()")
    op.drop_index('ix_audit_events_action_id', table_name='audit_events')
    op.drop_index('ix_audit_events_app_id_id', table_name='audit_events')
    op.drop_table('audit_events')  # drops SQLite's triggers with it
    with op.batch_alter_table('api_keys') as batch:
        batch.drop_constraint(op.f('fk_api_keys_rotated_from_api_keys'), type_='foreignkey')
        batch.drop_column('rotated_from')
        batch.drop_column('last_used_at')
        batch.drop_column('description')
