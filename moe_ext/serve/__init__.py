"""moe_ext.serve: the HTTP server of `moe-ext serve` over an exported generation folder and
a reward model: generation with steering (onnxruntime-genai or onnxruntime), reward scoring,
and per-user online feedback with profiles in SQLite or a server database.

    from moe_ext.serve import TextEngine, RewardEngine, make_app, open_store, feedback_update
    reward = RewardEngine("out/rm")
    app = make_app(TextEngine("deploy/pmol"), reward, open_store("profiles.db", reward.num_experts),
                   feedback_update("hedge", 0.1))      # then uvicorn.run(app)
"""
import importlib

from .engines import RewardEngine, TextEngine, feedback_update, resolve_export
from .process import ServerProcess
from .profiles import Profile, SQLAlchemyProfileStore, SQLiteProfileStore, open_store


def __getattr__(name):
    # the app needs fastapi (the serve extra); the engines and stores do not
    if name in ("make_app", "ServeLimits"):
        return getattr(importlib.import_module(".app", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["make_app", "ServeLimits", "TextEngine", "RewardEngine", "feedback_update",
           "resolve_export", "ServerProcess", "open_store", "Profile", "SQLiteProfileStore", "SQLAlchemyProfileStore"]
