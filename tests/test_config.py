"""ClipConfig: defaults, legacy aliases, unknown keys, types and ranges."""
import pytest

from adapters.clip.config import ClipConfig
from adapters.clip.errors import ConfigError


def test_defaults_are_the_documented_ones():
    c = ClipConfig.from_dict({})
    assert c.model_name == "ViT-B/32"
    assert c.batch_size == 128
    assert c.num_epochs == 100
    assert c.early_stop is True
    assert c.early_stopping_epochs == 5
    assert c.betas == (0.9, 0.98)
    assert c.epsilon == 1e-6
    assert c.weight_decay == 0.001
    assert 5e-6 <= c.learning_rate <= 3e-5  # evidence-based default, not the seed's 5e-8


def test_legacy_keys_are_aliases_with_a_warning():
    warnings = []
    c = ClipConfig.from_dict({"early_stopping": False, "episilon": 1e-8}, warn=warnings.append)
    assert c.early_stop is False and c.epsilon == 1e-8
    assert len(warnings) == 2 and "early_stopping" in warnings[0] and "episilon" in warnings[1]


def test_conflicting_alias_and_key_is_an_error():
    with pytest.raises(ConfigError, match="both 'episilon'"):
        ClipConfig.from_dict({"episilon": 1e-8, "epsilon": 1e-6}, warn=lambda m: None)


def test_alias_equal_to_key_is_accepted():
    assert ClipConfig.from_dict({"episilon": 1e-6, "epsilon": 1e-6}, warn=lambda m: None).epsilon == 1e-6


def test_unknown_key_lists_valid_keys_and_suggests_closest():
    with pytest.raises(ConfigError) as info:
        ClipConfig.from_dict({"learning_rat": 1e-5})
    message = str(info.value)
    assert "did you mean 'learning_rate'" in message
    assert "valid keys:" in message and "weight_decay" in message


def test_platform_keys_are_tolerated():
    c = ClipConfig.from_dict({"id_to_label_map": {"0": "cat"}, "label_to_id_map": {"cat": 0}})
    assert c.model_name == "ViT-B/32"


@pytest.mark.parametrize("key,value,fragment", [
    ("learning_rate", -1.0, "learning_rate"),
    ("learning_rate", 0, "learning_rate"),
    ("betas", [0.9, 1.0], "each beta must be in [0, 1)"),
    ("betas", [-0.1, 0.9], "each beta must be in [0, 1)"),
    ("betas", [0.9], "betas"),
    ("batch_size", 0, "batch_size"),
    ("batch_size", "many", "batch_size"),
    ("early_stop", "maybe", "early_stop"),
    ("epsilon", 0, "epsilon"),
    ("weight_decay", -0.1, "weight_decay"),
    ("device", "tpu", "device"),
    ("prompt_templates", ["no slot"], "has no '{}'"),
    ("wise_ft_alpha", 1.5, "wise_ft_alpha"),
    ("model_name", "", "model_name"),
])
def test_wrong_types_and_ranges_are_errors(key, value, fragment):
    with pytest.raises(ConfigError, match="invalid configuration") as info:
        ClipConfig.from_dict({key: value})
    assert fragment in str(info.value)


def test_round_trip_through_dict_is_json_ready():
    import json
    c = ClipConfig.from_dict({"betas": [0.8, 0.9], "wise_ft_alpha": "auto"})
    data = json.loads(json.dumps(c.to_dict()))
    assert data["betas"] == [0.8, 0.9]
    assert ClipConfig.from_dict(data) == c


def test_updated_validates_changes():
    c = ClipConfig()
    assert c.updated(batch_size=8).batch_size == 8
    with pytest.raises(ConfigError):
        c.updated(batch_size=-8)


# ---- on the platform (unknown_keys="warn"): nothing the app does not know stops a deploy --------
EARLIER_ADAPTER_CONFIGURATION = {  # what the earlier Dataloop CLIP adapter's models carry
    "model_name": "ViT-B/32", "batch_size": 128, "num_epochs": 100, "early_stopping": True,
    "early_stopping_epochs": 5, "betas": [0.9, 0.98], "episilon": 1e-6, "learning_rate": 5e-8,
    "weight_decay": 0.001, "weights_filename": "best.pt",
}


def test_the_earlier_adapters_configuration_loads_without_a_warning_about_weights_filename():
    warnings = []
    c = ClipConfig.from_dict(EARLIER_ADAPTER_CONFIGURATION, warn=warnings.append, unknown_keys="warn")
    assert c.weights_filename == "best.pt" and c.early_stop is True and c.epsilon == 1e-6
    assert len(warnings) == 2 and not any("weights_filename" in w for w in warnings)
    # ...and it is valid for the CLI too: weights_filename is a key, not a typo
    assert ClipConfig.from_dict(EARLIER_ADAPTER_CONFIGURATION, warn=lambda m: None).weights_filename == "best.pt"


def test_unknown_keys_warn_once_each_naming_the_closest_key():
    warnings = []
    c = ClipConfig.from_dict({"learning_rat": 3e-5, "added_by_a_later_platform": {"x": 1}},
                             warn=warnings.append, unknown_keys="warn")
    assert c.learning_rate == ClipConfig().learning_rate  # ignored, not guessed
    assert len(warnings) == 2
    assert "'learning_rat'" in warnings[0] and "did you mean 'learning_rate'" in warnings[0]
    assert "'added_by_a_later_platform'" in warnings[1] and "valid keys" not in warnings[1]


def test_conflicting_alias_is_a_warning_on_the_platform_and_the_new_key_wins():
    warnings = []
    c = ClipConfig.from_dict({"episilon": 1e-8, "epsilon": 1e-6}, warn=warnings.append, unknown_keys="warn")
    assert c.epsilon == 1e-6 and "using 'epsilon'" in warnings[0]


def test_bad_values_stay_errors_on_the_platform():
    with pytest.raises(ConfigError, match="learning_rate"):
        ClipConfig.from_dict({"learning_rate": -1.0}, unknown_keys="warn")
