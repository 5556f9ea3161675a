"""ft_files, ft_jobs, ft_job_events: the fine-tuning jobs API (/v1/files, /v1/fine_tuning/jobs)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 16:33:22.818452

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    # Registries made by create_all after the jobs tables were added but before migrations
    # existed already have them: create only the missing ones.
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if 'ft_files' not in existing:
        op.create_table('ft_files',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('created_at', sa.Integer(), nullable=False),
        sa.Column('filename', sa.String(length=500), nullable=False),
        sa.Column('purpose', sa.String(length=40), nullable=False),
        sa.Column('bytes', sa.Integer(), nullable=False),
        sa.Column('path', sa.String(length=1000), nullable=False),
        sa.Column('train_path', sa.String(length=1000), nullable=False),
        sa.Column('kind', sa.String(length=20), nullable=False),
        sa.Column('format', sa.String(length=40), nullable=False),
        sa.Column('rows', sa.Integer(), nullable=False),
        sa.Column('deleted', sa.Boolean(), nullable=False),
        sa.Column('key_id', sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint('id')
        )
    if 'ft_jobs' not in existing:
        op.create_table('ft_jobs',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.Integer(), nullable=False),
        sa.Column('model', sa.String(length=500), nullable=False),
        sa.Column('training_file', sa.String(length=40), nullable=False),
        sa.Column('validation_file', sa.String(length=40), nullable=True),
        sa.Column('method', sa.JSON(), nullable=False),
        sa.Column('suffix', sa.String(length=64), nullable=True),
        sa.Column('seed', sa.Integer(), nullable=False),
        sa.Column('metadata', sa.JSON(), nullable=True),
        sa.Column('run_config', sa.JSON(), nullable=False),
        sa.Column('registry_name', sa.String(length=200), nullable=False),
        sa.Column('status', sa.String(length=20), nullable=False),
        sa.Column('run_dir', sa.String(length=1000), nullable=False),
        sa.Column('fine_tuned_model', sa.String(length=300), nullable=True),
        sa.Column('error', sa.JSON(), nullable=True),
        sa.Column('finished_at', sa.Integer(), nullable=True),
        sa.Column('trained_tokens', sa.Integer(), nullable=True),
        sa.Column('restarts', sa.Integer(), nullable=False),
        sa.Column('result_files', sa.JSON(), nullable=True),
        sa.Column('key_id', sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(['training_file'], ['ft_files.id'], ),
        sa.ForeignKeyConstraint(['validation_file'], ['ft_files.id'], ),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('seq')
        )
        with op.batch_alter_table('ft_jobs', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_ft_jobs_status'), ['status'], unique=False)
    if 'ft_job_events' not in existing:
        op.create_table('ft_job_events',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.String(length=40), nullable=False),
        sa.Column('created_at', sa.Integer(), nullable=False),
        sa.Column('level', sa.String(length=10), nullable=False),
        sa.Column('message', sa.Text(), nullable=False),
        sa.Column('type', sa.String(length=10), nullable=False),
        sa.Column('data', sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['ft_jobs.id'], ),
        sa.PrimaryKeyConstraint('id')
        )
        with op.batch_alter_table('ft_job_events', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_ft_job_events_job_id'), ['job_id'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('ft_job_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ft_job_events_job_id'))

    op.drop_table('ft_job_events')
    with op.batch_alter_table('ft_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ft_jobs_status'))

    op.drop_table('ft_jobs')
    op.drop_table('ft_files')
