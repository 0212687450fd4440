"""Shared fixtures: real servers started once per test session."""

from tests.servers.fixtures import s3_server
from tests.servers.postgres import postgres_server

__all__ = ["postgres_server", "s3_server"]
