"""Fixtures of the Hugging Face tests (built in hf_fixtures.py)."""
from hf_fixtures import hf_models, pref_files  # noqa: F401
