"""Shared test helpers: the session's Ray cluster and extra apps, API apps with dependency overrides, job
stores and requests, the CPU Scheduler harness, servers started on loopback (PostgreSQL, SeaweedFS,
Prometheus), the diffusers reference pipeline, safety hooks and the emulated GPU machine."""
