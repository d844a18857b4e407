"""User profiles of `moe-ext serve`: each user's weights over the reward model's experts and
the expert margins of every labelled pair they sent, in an embedded SQLite file (default)
or in a server database through SQLAlchemy (a URL such as postgresql://..., for several
server processes).

A feedback is one transaction: the pair's margins are inserted, the user's row is locked
(SQLite: BEGIN IMMEDIATE, one writer at a time; other databases: SELECT ... FOR UPDATE),
the new weights are computed from the old ones and all the user's margins, and the row is
written; so concurrent feedback for one user loses no update, and a crash leaves the last
committed state. Values are stored as JSON text (no pickle).

Tables: meta (key, value: the number of experts E, checked on open), users (user_id,
weights JSON (E,), pairs, updated unix time), feedback (id, user_id, margins JSON (E,)).
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Callable, Optional

class StoreBusy(RuntimeError):
    """The database could not take the update in time (locked by other writers)."""


# update(previous weights (E,) or None for a new user, all margins (n, E) oldest first)
#   -> new weights (E,)
Update = Callable[[Optional[list[float]], list[list[float]]], list[float]]


@dataclass
class Profile:
    user_id: str
    weights: list[float]     # (E,) a probability vector over the experts
    pairs: int               # labelled pairs received
    updated: float           # unix time of the last update

    def to_dict(self) -> dict:
        return {"user_id": self.user_id, "weights": self.weights, "pairs": self.pairs,
                "updated": self.updated}


def _check_user(user_id) -> str:
    if not isinstance(user_id, str) or not 1 <= len(user_id) <= 256:
        raise ValueError(f"user_id must be a string of 1 to 256 characters, got {user_id!r}")
    return user_id


class SQLiteProfileStore:
    """Profiles in the SQLite file `path` (created with its tables when missing), for
    `num_experts` experts. One connection per call, so any thread may call it. A writer
    waits up to `timeout` seconds for another one, then StoreBusy."""

    kind = "sqlite"

    def __init__(self, path: str, num_experts: int, timeout: float = 60.0):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ValueError(f"--db {path!r}: folder {folder!r} does not exist")
        self.path, self.num_experts, self.timeout = path, int(num_experts), float(timeout)
        try:
            con = self._connect()
        except sqlite3.Error as err:
            raise ValueError(f"--db {path!r}: cannot open it as SQLite ({err})") from None
        try:
            con.execute("PRAGMA journal_mode=WAL")  # readers do not wait for the writer
            con.execute("BEGIN IMMEDIATE")
            con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            con.execute("CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, "
                        "weights TEXT NOT NULL, pairs INTEGER NOT NULL, updated REAL NOT NULL)")
            con.execute("CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY "
                        "AUTOINCREMENT, user_id TEXT NOT NULL, margins TEXT NOT NULL)")
            con.execute("CREATE INDEX IF NOT EXISTS feedback_user ON feedback (user_id, id)")
            row = con.execute("SELECT value FROM meta WHERE key = 'num_experts'").fetchone()
            if row is None:
                con.execute("INSERT INTO meta VALUES ('num_experts', ?)", (str(self.num_experts),))
            con.execute("COMMIT")
        except sqlite3.DatabaseError as err:
            con.close()
            raise ValueError(f"--db {path!r}: not a usable SQLite database ({err})") from None
        con.close()
        if row is not None and int(row[0]) != self.num_experts:
            raise ValueError(f"--db {path!r} holds profiles over {row[0]} experts; this reward "
                             f"model has {self.num_experts}")

    def _connect(self) -> sqlite3.Connection:
        # isolation_level None: transactions are the explicit BEGIN IMMEDIATE ... COMMIT;
        # timeout: how long a writer waits for another one to commit
        return sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                               check_same_thread=False)

    def get(self, user_id: str) -> Optional[Profile]:
        con = self._connect()
        try:
            row = con.execute("SELECT weights, pairs, updated FROM users WHERE user_id = ?",
                              (_check_user(user_id),)).fetchone()
        finally:
            con.close()
        return None if row is None else Profile(user_id, json.loads(row[0]), row[1], row[2])

    def add_feedback(self, user_id: str, margins: list[float], update: Update) -> Profile:
        """Records one pair's expert margins (E,) for the user and stores update(old
        weights, all margins) as their weights, atomically; returns the new profile."""
        _check_user(user_id)
        con = self._connect()
        try:
            try:
                con.execute("BEGIN IMMEDIATE")  # the write lock first: no lost update
            except sqlite3.OperationalError as err:  # still locked after the timeout
                raise StoreBusy(f"profile database busy: {err}") from None
            try:
                row = con.execute("SELECT weights FROM users WHERE user_id = ?", (user_id,)).fetchone()
                con.execute("INSERT INTO feedback (user_id, margins) VALUES (?, ?)",
                            (user_id, json.dumps([float(m) for m in margins])))
                history = [json.loads(m) for (m,) in con.execute(
                    "SELECT margins FROM feedback WHERE user_id = ? ORDER BY id", (user_id,))]
                weights = [float(w) for w in update(None if row is None else json.loads(row[0]),
                                                    history)]
                now = time.time()
                con.execute("INSERT INTO users VALUES (?, ?, ?, ?) ON CONFLICT(user_id) DO UPDATE "
                            "SET weights = excluded.weights, pairs = excluded.pairs, "
                            "updated = excluded.updated",
                            (user_id, json.dumps(weights), len(history), now))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        finally:
            con.close()
        return Profile(user_id, weights, len(history), now)


class SQLAlchemyProfileStore:
    """The same tables in any database SQLAlchemy reaches (`url`, e.g.
    postgresql+psycopg://user:pass@host/db), so that several server processes share the
    profiles; the user's row is locked with SELECT ... FOR UPDATE during a feedback."""

    def __init__(self, url: str, num_experts: int):
        try:
            import sqlalchemy as sa
        except ImportError:
            raise ValueError(f"--db {url!r}: a database URL needs SQLAlchemy "
                             f"(pip install 'moe_ext[serve-db]' and the database's driver)") from None
        self.sa, self.num_experts = sa, int(num_experts)
        try:
            self.engine = sa.create_engine(url)
        except (sa.exc.ArgumentError, ImportError) as err:
            raise ValueError(f"--db {url!r}: {err}") from None
        self.kind = self.engine.dialect.name
        if self.kind == "sqlite":
            # pysqlite begins transactions lazily; take the write lock at BEGIN instead
            @sa.event.listens_for(self.engine, "connect")
            def _autocommit(dbapi_connection, _record):
                dbapi_connection.isolation_level = None

            @sa.event.listens_for(self.engine, "begin")
            def _immediate(connection):
                connection.exec_driver_sql("BEGIN IMMEDIATE")
        md = sa.MetaData()
        self.meta = sa.Table("meta", md, sa.Column("key", sa.String(64), primary_key=True),
                             sa.Column("value", sa.Text, nullable=False))
        self.users = sa.Table("users", md, sa.Column("user_id", sa.String(256), primary_key=True),
                              sa.Column("weights", sa.Text, nullable=False),
                              sa.Column("pairs", sa.Integer, nullable=False),
                              sa.Column("updated", sa.Float, nullable=False))
        self.feedback = sa.Table("feedback", md,
                                 sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                                 sa.Column("user_id", sa.String(256), nullable=False, index=True),
                                 sa.Column("margins", sa.Text, nullable=False))
        try:
            md.create_all(self.engine)
            with self.engine.begin() as con:
                row = con.execute(sa.select(self.meta.c.value).where(
                    self.meta.c.key == "num_experts")).first()
                if row is None:
                    con.execute(self.meta.insert().values(key="num_experts",
                                                          value=str(self.num_experts)))
        except sa.exc.SQLAlchemyError as err:
            raise ValueError(f"--db {url!r}: {str(err).splitlines()[0]}") from None
        if row is not None and int(row[0]) != self.num_experts:
            raise ValueError(f"--db {url!r} holds profiles over {row[0]} experts; this reward "
                             f"model has {self.num_experts}")

    def get(self, user_id: str) -> Optional[Profile]:
        sa, u = self.sa, self.users
        with self.engine.connect() as con:
            row = con.execute(sa.select(u.c.weights, u.c.pairs, u.c.updated).where(
                u.c.user_id == _check_user(user_id))).first()
        return None if row is None or row[1] == 0 else Profile(user_id, json.loads(row[0]),
                                                               row[1], row[2])

    def add_feedback(self, user_id: str, margins: list[float], update: Update) -> Profile:
        sa, u, f = self.sa, self.users, self.feedback
        _check_user(user_id)
        try:  # the user's row must exist to be locked; two creators: one wins, both go on
            with self.engine.begin() as con:
                if con.execute(sa.select(u.c.pairs).where(u.c.user_id == user_id)).first() is None:
                    con.execute(u.insert().values(user_id=user_id, weights="null", pairs=0,
                                                  updated=time.time()))
        except sa.exc.IntegrityError:
            pass
        with self.engine.begin() as con:
            row = con.execute(sa.select(u.c.weights).where(u.c.user_id == user_id)
                              .with_for_update()).first()
            con.execute(f.insert().values(user_id=user_id,
                                          margins=json.dumps([float(m) for m in margins])))
            history = [json.loads(m) for (m,) in con.execute(
                sa.select(f.c.margins).where(f.c.user_id == user_id).order_by(f.c.id))]
            weights = [float(w) for w in update(json.loads(row[0]), history)]
            now = time.time()
            con.execute(u.update().where(u.c.user_id == user_id).values(
                weights=json.dumps(weights), pairs=len(history), updated=now))
        return Profile(user_id, weights, len(history), now)


def open_store(db: str, num_experts: int):
    """A SQLite file path (default store) or a SQLAlchemy database URL (scheme://...)."""
    if not isinstance(db, str) or not db:
        raise ValueError(f"--db must be a SQLite file path or a database URL, got {db!r}")
    if "://" in db:
        return SQLAlchemyProfileStore(db, num_experts)
    return SQLiteProfileStore(db, num_experts)
