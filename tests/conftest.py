"""Shared fixtures: real servers started once per test session."""

from tests.servers.fixtures import s3_server

__all__ = ["s3_server"]
