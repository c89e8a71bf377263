"""Alembic revisions of Ablate's tables (../models.py). A store brings its database to the newest one
when it opens it (../migrate.py); nobody runs `alembic upgrade` in a deployment.

To change the schema (a new table or column):
1. Change the models in ../models.py.
2. Let Alembic write the revision from the difference against a scratch database at the newest revision:
       export ABLATE_STATE_URL=sqlite:////tmp/ablate-scratch.db
       .venv/bin/alembic -c orchestrator/state/migrations/alembic.ini upgrade head
       .venv/bin/alembic -c orchestrator/state/migrations/alembic.ini revision --autogenerate \
           --rev-id 0003 -m "trial mlflow run ids"
3. Read what it wrote in versions/: autogenerate misses renames and data moves; keep its
   `batch_alter_table` blocks (sqlite alters little in place); a new NOT NULL column needs a
   `server_default`, since existing rows need a value.
4. tests/test_state.py checks that the models and the revisions agree, on sqlite and PostgreSQL.
Raise `ablate_meta.schema_version` (models.Meta) only in a revision that releases from before migrations
would misread.
"""
