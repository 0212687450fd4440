"""Previz model side: Wan2.2 T2V stages usable in one process or inside a Ray Serve replica.

Nothing in this package imports Ray or `serve`.
"""
