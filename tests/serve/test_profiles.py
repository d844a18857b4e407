"""The profile stores of `moe-ext serve`, SQLite (default) and SQLAlchemy (here on a SQLite
URL; PostgreSQL takes the same code with row locks): concurrent feedback from many threads
loses no update, a reopened store keeps the profiles, and bad databases are named."""
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moe_ext.reward import adapt_weights
from moe_ext.serve import SQLiteProfileStore, feedback_update, open_store
from moe_ext.serve.profiles import StoreBusy

E = 3


def stores(tmp_path):
    out = [("sqlite", lambda: open_store(str(tmp_path / "p.db"), E))]
    try:
        import sqlalchemy  # noqa: F401
        out.append(("sqlalchemy", lambda: open_store(f"sqlite:///{tmp_path / 'q.db'}", E)))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("kind", ["sqlite", "sqlalchemy"])
def test_concurrent_feedback_and_reopen(tmp_path, kind):
    made = dict(stores(tmp_path))
    if kind not in made:
        pytest.skip("sqlalchemy is not installed")
    store = made[kind]()
    g = torch.Generator().manual_seed(0)
    margins = (torch.randn(40, E, generator=g) * 2).tolist()
    update = feedback_update("hedge", 0.5)
    with ThreadPoolExecutor(8) as pool:
        seen = list(pool.map(lambda m: store.add_feedback("u", m, update).pairs, margins))
    assert sorted(seen) == list(range(1, 41))  # every transaction saw all the earlier ones
    profile = store.get("u")
    want = adapt_weights(torch.tensor(margins), "hedge", eta=0.5)
    assert profile.pairs == 40 and profile.weights == pytest.approx(want.tolist(), abs=1e-5)
    again = made[kind]().get("u")  # a new store on the same database: a restart
    assert again.weights == profile.weights and again.pairs == 40
    assert store.get("nobody") is None


def test_refit_methods_use_every_pair(tmp_path):
    store = open_store(str(tmp_path / "p.db"), E)
    margins = [[1.0, -1.0, 0.0], [2.0, 0.5, -1.0], [0.0, 1.0, 1.0]]
    for m in margins:
        profile = store.add_feedback("u", m, feedback_update("hyre", 0.1))
    assert profile.weights == pytest.approx(adapt_weights(torch.tensor(margins), "hyre").tolist(), abs=1e-6)


def test_bad_stores_are_named(tmp_path):
    open_store(str(tmp_path / "p.db"), E)
    with pytest.raises(ValueError, match="holds profiles over 3 experts; this reward model has 4"):
        open_store(str(tmp_path / "p.db"), 4)
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="junk.db"):
        SQLiteProfileStore(str(tmp_path / "junk.db"), E)
    with pytest.raises(ValueError, match="does not exist"):
        open_store(str(tmp_path / "missing" / "p.db"), E)
    with pytest.raises(ValueError, match="user_id"):
        open_store(str(tmp_path / "p.db"), E).get("")
    with pytest.raises(ValueError, match="method must be one of"):
        feedback_update("sgd", 0.1)
    with pytest.raises(ValueError, match="eta"):
        feedback_update("hedge", 0.0)
    # a failed update leaves nothing behind (the transaction rolls back)
    store = open_store(str(tmp_path / "p.db"), E)

    def broken(previous, history):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        store.add_feedback("v", [0.0, 0.0, 0.0], broken)
    assert store.get("v") is None
    rows = sqlite3.connect(str(tmp_path / "p.db")).execute(
        "SELECT COUNT(*) FROM feedback WHERE user_id = 'v'").fetchone()[0]
    assert rows == 0


def test_a_writer_that_cannot_get_the_lock_gets_store_busy(tmp_path):
    """(The server answers it with 503 and Retry-After.) Another connection holds the write
    lock; the update waits `timeout` seconds, then raises StoreBusy and changes nothing."""
    store = SQLiteProfileStore(str(tmp_path / "p.db"), E, timeout=0.2)
    other = sqlite3.connect(str(tmp_path / "p.db"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreBusy, match="busy"):
            store.add_feedback("u", [0.0, 1.0, 0.0], feedback_update("hedge", 0.1))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.get("u") is None
    assert store.add_feedback("u", [0.0, 1.0, 0.0], feedback_update("hedge", 0.1)).pairs == 1
