"""Run specs: keys that identify a run, and specs that can be stored."""

import pytest

from bnlab.study.specs import make_spec, spec_key, unique_specs


def test_spec_key_ignores_field_order_and_sees_every_value():
    a = make_spec("train", lr=0.1, seed=0, norm="bn")
    b = make_spec("train", norm="bn", seed=0, lr=0.1)
    assert spec_key(a) == spec_key(b)
    assert spec_key(a) != spec_key(make_spec("train", lr=0.1, seed=1, norm="bn"))
    assert list(unique_specs([a, b, make_spec("signal", seed=0)])) == [spec_key(a), spec_key(make_spec("signal", seed=0))]


def test_make_spec_rejects_unknown_kinds_and_unstorable_values():
    with pytest.raises(ValueError, match="kind"):
        make_spec("fly")
    with pytest.raises(TypeError):
        make_spec("train", lr=object())
