"""Previz serving side: the CLI and (later) Ray Serve deployments wrapping `pipeline` stages."""
