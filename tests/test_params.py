"""Parameter models and the per-method rule table (analysis.api.params): every method and every
registry parameter has a rule, values are checked and never coerced, plans are checked."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from analysis.api import params as P
from analysis.harness.methods import REGISTRY


def test_every_method_and_every_registry_parameter_has_a_rule():
    """A method added to METHODS or a parameter added to its registry defaults without a rule
    fails here (and would be refused at submission)."""
    assert set(P.METHOD_RULES) == set(P.METHODS)
    for name, entry in REGISTRY.items():
        missing = set(entry.defaults) - set(P.METHOD_RULES[name])
        assert not missing, f"{name}: no rule for {sorted(missing)}"
        for key, default in entry.defaults.items():
            assert P.METHOD_RULES[name][key].check(default) is None, (name, key, default)


@pytest.mark.parametrize("name", P.METHODS)
def test_every_method_accepts_its_registry_defaults(name):
    ratio = 0.0 if name == "full" else 0.5
    spec = P.MethodSpec(name=name, compression_ratio=ratio, params=dict(REGISTRY[name].defaults))
    assert spec.params == REGISTRY[name].defaults


BAD_SPECS = [
    ({"name": "snapkv", "compression_ratio": 0.5, "params": {"window_size": -1}},
     "params.window_size of method 'snapkv' must be in [1"),
    ({"name": "snapkv", "params": {"window_size": [4]}}, "must be an integer"),
    ({"name": "snapkv", "params": {"window_size": "64"}}, "must be an integer"),
    ({"name": "snapkv", "params": {"window_size": 10**9}}, "must be in [1, 131072]"),
    ({"name": "snapkv", "params": {"kernel_size": 4}}, "be odd"),
    ({"name": "snapkv", "params": {"windw_size": 4}}, "has no parameter 'windw_size'"),
    ({"name": "faedkv", "params": {"variant": "fft"}}, "must be one of 'iwdft'"),
    ({"name": "faedkv", "params": {"key_space": 1}}, "must be one of 'post_rope'"),
    ({"name": "faedkv", "params": {"mass_correction": 1}}, "must be true or false"),
    ({"name": "faedkv", "params": {"sink_tokens": True}}, "must be an integer"),
    ({"name": "faedkv", "params": {"window": 2.5}}, "must be an integer"),
    ({"name": "faedkv", "params": {"slot_normalization": "median"}}, "'mean', 'sum'"),
    ({"name": "faedkv", "params": {"plan": "low-pass"}}, "FrequencyPlan JSON object"),
    ({"name": "faedkv", "params": {"plan": {"layers": []}}}, "non-empty list"),
    ({"name": "faedkv", "params": {"plan": {"layers": [[0, 30]], "chunks": 22}}}, "chunks 0..21"),
    ({"name": "faedkv", "params": {"plan": {"layers": [[0]], "colour": 1}}}, "unknown: colour"),
    ({"name": "faedkv", "params": {"plan": {"layers": [[0]], "chunks": "22"}}}, "chunks an integer"),
    ({"name": "dct_iterative", "params": {"variant": "iwdft"}}, "one of 'dct-iterative'"),
    ({"name": "faedkv", "params": {"window_share": 1.0}}, "params.window_share of method 'faedkv' must be in [0, 0.999]"),
    ({"name": "faedkv", "params": {"window_share": "0.5"}}, "params.window_share of method 'faedkv' must be a number"),
    ({"name": "faedkv", "params": {"variant": "dct-iterative", "window_share": 0.5}},
     "dct-iterative re-compresses every `window` tokens: drop window_share"),
    ({"name": "dct_iterative", "params": {"window_share": 0.5}}, "has no parameter 'window_share'"),
    ({"name": "expected_attention", "params": {"epsilon": float("inf")}}, "must be a number"),
    ({"name": "pyramidkv", "params": {"beta": 0.5}}, "must be in [1"),
    ({"name": "full", "compression_ratio": 0.5}, "compression_ratio must be 0"),
    ({"name": "tova", "params": {"anything": 1}}, "its parameters: none"),
    ({"name": "snapkv", "compression_ratio": "0.5"}, "valid number"),
    ({"name": "snapkv", "compression_ratio": 1.0}, "less than 1"),
]


@pytest.mark.parametrize("raw,message", BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_method_params_are_refused_naming_the_field(raw, message):
    with pytest.raises(ValidationError) as err:
        P.MethodSpec.model_validate(raw)
    assert message in str(err.value)


def test_plans_in_the_shape_frequencyplan_writes_are_accepted():
    per_kind = {"key": [0, 1], "value": [[0], [1, 2]]}          # keys shared, values per head
    spec = P.MethodSpec(name="faedkv", compression_ratio=0.5,
                        params={"plan": {"name": "mine", "chunks": 4, "layers": [[0], per_kind]}})
    assert spec.label == "faedkv-iwdft-mine@0.5"
    assert P.plan_problem(None) is None


@pytest.mark.parametrize("field,value", [("lengths", ["512"]), ("samples", "5"),
                                         ("samples", 5.0), ("seed", 2**40), ("depths", ["50"])])
def test_grid_numbers_are_not_coerced(field, value):
    with pytest.raises(ValidationError):
        P.NeedleParams.model_validate({"methods": [{"name": "snapkv"}], field: value})


def test_ablation_layers_and_middle_are_checked_up_front():
    with pytest.raises(ValidationError, match="at least 1 item"):
        P.AblateParams(layers=[])
    with pytest.raises(ValidationError, match="lists a layer twice"):
        P.AblateParams(layers=[1, 1])
    with pytest.raises(ValidationError, match="too few for 22 chunks"):
        P.AblateParams(prefix_tokens=64, sink_tokens=4, window=64)
    assert P.AblateParams(layers=[0, 2]).num_cells(3) == 2 * 22 + 1


def test_minimum_tokens_of_window_methods():
    assert P.minimum_tokens(P.MethodSpec(name="snapkv", params={"window_size": 100})) == (
        101, "window_size (100) + 1")
    assert P.minimum_tokens(P.MethodSpec(name="knorm")) == (1, "")
