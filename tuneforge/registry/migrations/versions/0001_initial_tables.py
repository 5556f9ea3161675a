"""initial tables: the registry (models, versions, aliases, alias events, API keys) and
production tables (request logs, feedback, review items) as they were before migrations

Revision ID: 0001
Revises: 
Create Date: 2026-11-29 15:49:14.739766

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    # A registry made before migrations (Base.metadata.create_all) already has some of these
    # tables, depending on its age: create only the missing ones; existing ones keep their rows.
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if 'api_keys' not in existing:
        op.create_table('api_keys',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('key_hash', sa.String(length=64), nullable=False),
        sa.Column('prefix', sa.String(length=12), nullable=False),
        sa.Column('models', sa.JSON(), nullable=False),
        sa.Column('requests_per_minute', sa.Integer(), nullable=True),
        sa.Column('created', sa.DateTime(), nullable=False),
        sa.Column('revoked', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('key_hash')
        )
    if 'models' not in existing:
        op.create_table('models',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('created', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('name')
        )
    if 'request_logs' not in existing:
        op.create_table('request_logs',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.Column('endpoint', sa.String(length=20), nullable=False),
        sa.Column('model', sa.String(length=200), nullable=False),
        sa.Column('route', sa.String(length=200), nullable=True),
        sa.Column('version', sa.String(length=200), nullable=True),
        sa.Column('arm', sa.String(length=100), nullable=True),
        sa.Column('key_id', sa.Integer(), nullable=True),
        sa.Column('user', sa.String(length=200), nullable=True),
        sa.Column('status', sa.Integer(), nullable=False),
        sa.Column('latency_s', sa.Float(), nullable=False),
        sa.Column('prompt_tokens', sa.Integer(), nullable=False),
        sa.Column('completion_tokens', sa.Integer(), nullable=False),
        sa.Column('finish_reason', sa.String(length=20), nullable=True),
        sa.Column('fallback_reason', sa.Text(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('json_requested', sa.Boolean(), nullable=False),
        sa.Column('messages', sa.JSON(), nullable=True),
        sa.Column('prompt', sa.Text(), nullable=True),
        sa.Column('response', sa.Text(), nullable=True),
        sa.Column('redactions', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('id')
        )
        with op.batch_alter_table('request_logs', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_request_logs_at'), ['at'], unique=False)
            batch_op.create_index(batch_op.f('ix_request_logs_route'), ['route'], unique=False)
            batch_op.create_index(batch_op.f('ix_request_logs_version'), ['version'], unique=False)
    if 'alias_events' not in existing:
        op.create_table('alias_events',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('model_id', sa.Integer(), nullable=False),
        sa.Column('alias', sa.String(length=100), nullable=False),
        sa.Column('action', sa.String(length=20), nullable=False),
        sa.Column('from_version', sa.Integer(), nullable=True),
        sa.Column('to_version', sa.Integer(), nullable=False),
        sa.Column('note', sa.String(length=500), nullable=False),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['model_id'], ['models.id'], ),
        sa.PrimaryKeyConstraint('id')
        )
    if 'feedback' not in existing:
        op.create_table('feedback',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('request_id', sa.String(length=64), nullable=False),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.Column('score', sa.Float(), nullable=True),
        sa.Column('thumbs', sa.String(length=4), nullable=True),
        sa.Column('correction', sa.Text(), nullable=True),
        sa.Column('comment', sa.Text(), nullable=True),
        sa.Column('key_id', sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(['request_id'], ['request_logs.id'], ),
        sa.PrimaryKeyConstraint('id')
        )
        with op.batch_alter_table('feedback', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_feedback_request_id'), ['request_id'], unique=False)
    if 'review_items' not in existing:
        op.create_table('review_items',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('request_id', sa.String(length=64), nullable=False),
        sa.Column('reason', sa.String(length=40), nullable=False),
        sa.Column('detail', sa.Text(), nullable=False),
        sa.Column('queued_at', sa.DateTime(), nullable=False),
        sa.Column('decision', sa.String(length=10), nullable=True),
        sa.Column('corrected', sa.Text(), nullable=True),
        sa.Column('reviewer', sa.String(length=200), nullable=True),
        sa.Column('decided_at', sa.DateTime(), nullable=True),
        sa.Column('used_in', sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(['request_id'], ['request_logs.id'], ),
        sa.PrimaryKeyConstraint('id')
        )
        with op.batch_alter_table('review_items', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_review_items_request_id'), ['request_id'], unique=True)
    if 'versions' not in existing:
        op.create_table('versions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('model_id', sa.Integer(), nullable=False),
        sa.Column('number', sa.Integer(), nullable=False),
        sa.Column('run_dir', sa.String(length=1000), nullable=False),
        sa.Column('base_model', sa.String(length=1000), nullable=False),
        sa.Column('adapter_sha256', sa.String(length=64), nullable=False),
        sa.Column('scores', sa.JSON(), nullable=False),
        sa.Column('main_metric', sa.String(length=100), nullable=True),
        sa.Column('main_score', sa.Float(), nullable=True),
        sa.Column('created', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['model_id'], ['models.id'], ),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('model_id', 'number')
        )
    if 'aliases' not in existing:
        op.create_table('aliases',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('model_id', sa.Integer(), nullable=False),
        sa.Column('alias', sa.String(length=100), nullable=False),
        sa.Column('version_id', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['model_id'], ['models.id'], ),
        sa.ForeignKeyConstraint(['version_id'], ['versions.id'], ),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('model_id', 'alias')
        )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('aliases')
    op.drop_table('versions')
    with op.batch_alter_table('review_items', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_review_items_request_id'))

    op.drop_table('review_items')
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_feedback_request_id'))

    op.drop_table('feedback')
    op.drop_table('alias_events')
    with op.batch_alter_table('request_logs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_request_logs_version'))
        batch_op.drop_index(batch_op.f('ix_request_logs_route'))
        batch_op.drop_index(batch_op.f('ix_request_logs_at'))

    op.drop_table('request_logs')
    op.drop_table('models')
    op.drop_table('api_keys')
