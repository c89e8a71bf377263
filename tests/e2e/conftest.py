"""The distributed end-to-end tests (tests/e2e): their marker, registered here rather than in pyproject."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "e2e: the whole deployed topology (Postgres, MLflow server, multi-node Ray, `ablate serve`) "
                   "in its own namespaces, with faults injected; slow, still run in CI")
