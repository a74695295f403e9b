"""Shared pytest fixtures. The data pipeline's live in tests/data_fixtures.py."""

from tests.data_fixtures import *  # noqa: F401,F403
