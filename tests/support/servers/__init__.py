"""Real servers started on loopback for integration tests (no mocks of the wire protocol)."""
