import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest

# Modules owned by the data-pipeline work that are integration tests as a whole (Ray clusters, Slurm,
# subprocesses); marked here so their files stay untouched. Other modules mark themselves.
_INTEGRATION_MODULES = {"test_data_pipeline.py", "test_data_pipeline_slurm.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in _INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)
