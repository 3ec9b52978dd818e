"""Settings shared by the study's tests."""

import matplotlib.pyplot as plt
import pytest


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")  # a claim's render draws the report's figures; nothing here shows them
