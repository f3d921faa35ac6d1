from __future__ import annotations


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "distributed: spawns CPU gloo process groups (tests/core)")
