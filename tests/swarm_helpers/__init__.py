"""Subprocess entry points and process handling for the swarm transport tests (tests/test_swarm_*.py)."""
