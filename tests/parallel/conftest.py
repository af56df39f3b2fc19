"""Fixtures of the parallel tests."""

import pytest

from support.toy_pipeline import single_process_reference


@pytest.fixture(scope="module")
def toy_reference() -> dict:
    """Losses, gradient norms, evaluation loss and final parameters of the toy model trained in one process."""
    return single_process_reference()
