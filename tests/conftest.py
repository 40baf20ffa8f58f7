import os
import shutil

import pytest

# Integration tests are marked `docker`; in CI they must run, so a missing engine fails loudly there.
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/integration/" in item.nodeid:
            item.add_marker(pytest.mark.docker)
    if os.environ.get("CI"):
        return
    if shutil.which("docker") is None or os.system("docker info >/dev/null 2>&1") != 0:
        skip = pytest.mark.skip(reason="no Docker engine here; CI runs these against a real one")
        for item in items:
            if "docker" in item.keywords:
                item.add_marker(skip)
