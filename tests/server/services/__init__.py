"""End-to-end tests, one module per gRPC service, on one shared real server.

A package so its conftest imports as `services.conftest` and does not replace `tests/conftest.py`
as the top-level `conftest` module the other test files import from.
"""
