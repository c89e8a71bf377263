"""A throwaway PostgreSQL 15 cluster (Debian's package) for tests: the state store's contract tests run on
it, and the distributed end-to-end scenario uses it for Ablate's state and MLflow's backend."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")  # Debian keeps initdb and pg_ctl off PATH


def postgres_missing() -> str | None:
    """Why no throwaway cluster can run on this machine, or None when one can."""
    if os.geteuid() != 0:
        return "needs root: Postgres runs as user `postgres` (runuser)"
    if not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
        return f"needs Debian's postgresql 15 ({PG_BIN}/initdb) and runuser"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "needs the `postgres` user of Debian's postgresql package"
    return None


class Postgres:
    """A cluster in FOLDER listening on 127.0.0.1:PORT, run as `postgres` (the server refuses root).

    FOLDER's parent must be traversable by `postgres`; its socket goes in FOLDER, so keep the path short.
    """

    def __init__(self, folder: Path, port: int):
        self.folder, self.data, self.port = folder, folder / "data", port

    def _as_postgres(self, *argv: str) -> None:
        out = subprocess.run(["runuser", "-u", "postgres", "--", *argv], cwd=self.folder, capture_output=True,
                             text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({out.returncode}): "
                               f"{out.stdout[-2000:]}{out.stderr[-2000:]}")

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.folder, "postgres", "postgres")
        os.chmod(self.folder, 0o700)
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                          "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "postgres.log"),
                          "-o", options, "-w", "-t", "120", "start")

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        import psycopg2
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name)

    def url(self, db: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
