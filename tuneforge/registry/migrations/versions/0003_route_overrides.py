"""route_overrides: arms that replace a route's serve.yaml arms (tuneforge improve's canary)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 16:30:14.738984

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    # Registries made by create_all after this table was added but before migrations existed
    # already have it.
    if not sa.inspect(op.get_bind()).has_table('route_overrides'):
        op.create_table('route_overrides',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('route', sa.String(length=200), nullable=False),
        sa.Column('arms', sa.JSON(), nullable=False),
        sa.Column('note', sa.String(length=500), nullable=False),
        sa.Column('started', sa.DateTime(), nullable=False),
        sa.Column('updated', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('route')
        )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('route_overrides')
