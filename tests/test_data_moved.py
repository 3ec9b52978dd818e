"""The modules that moved into bnlab.data still import under their old names for one release."""

import importlib
import re
import sys

import pytest


@pytest.mark.parametrize("old,new", [("bnlab.cifar", "bnlab.data.cifar"), ("bnlab.datadirs", "bnlab.data.dirs")])
def test_old_name_warns_and_is_the_new_module(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)   # so the old module runs again
    expected = f"{old} is now {new}; the old name works until bnlab 0.3"
    with pytest.warns(FutureWarning, match=f"^{re.escape(expected)}$") as record:
        __import__(old)
    assert [w.filename for w in record] == [__file__]   # the warning points at the line importing the old name
    module = sys.modules[old]
    assert module is importlib.import_module(new)
    parent, _, leaf = old.rpartition(".")
    assert getattr(sys.modules[parent], leaf) is module   # `from bnlab import cifar` gets the new module too
