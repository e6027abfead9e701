"""Plain helpers the tests share (fixtures live in tests/conftest.py). Light at import: no torch,
so a subprocess can compose configs without heavy imports (test_validation checks that)."""
from tests.helpers.payloads import pickle_payload
from tests.helpers.runs import TINY, compose_config, tiny_run

__all__ = ["TINY", "compose_config", "pickle_payload", "tiny_run"]
