import dataclasses

import pytest

import packer
from packer import ConfigError, PackConfig


@pytest.mark.parametrize("spec,expected", [
    ("native", packer._config.Native()),
    ("fixed:224", packer._config.Fixed(224.0)),
    ("budget:196", packer._config.Budget(196)),
    ("naflex:256", packer._config.NaFlex(256)),
    ("uniform:64:256", packer._config.Uniform(64.0, 256.0)),
    ("tnormal:64:384:-0.5:1:side", packer._config.TruncNormal(64.0, 384.0, -0.5, 1.0, "side")),
    ("tnormal:64:384:0.5:1:area", packer._config.TruncNormal(64.0, 384.0, 0.5, 1.0, "area")),
])
def test_resolution_specs_parse_and_round_trip(spec, expected):
    policy = packer.parse_resolution(spec)
    assert policy == expected
    assert packer.parse_resolution(policy.spec()) == policy


@pytest.mark.parametrize("spec", [
    "none", "const:0.25", "beta:0.3:0.9", "resdep:0.1:0.6", "resdep:0.1:0.6:16:256",
    "const:0.5@sigmoid:0.2:0.8:100000:-20000", "beta:0.4:0.9@sigmoid:0.2:0.8:1000:500",
])
def test_drop_specs_parse_and_round_trip(spec):
    policy = packer.parse_drop(spec)
    assert packer.parse_drop(policy.spec()) == policy


@pytest.mark.parametrize("kwargs,field", [
    ({"seq_len": 0}, "seq_len"),
    ({"seq_len": -5}, "seq_len"),
    ({"patch_size": 0}, "patch_size"),
    ({"resolution": "bogus"}, "resolution"),
    ({"resolution": "uniform:256:64"}, "resolution"),
    ({"resolution": "fixed:abc"}, "resolution"),
    ({"resolution": "budget:512", "seq_len": 256}, "resolution"),
    ({"resolution": "naflex:512", "seq_len": 256}, "resolution"),
    ({"resolution": "naflex:0"}, "resolution"),
    ({"resolution": "naflex:2.5"}, "resolution"),
    ({"resolution": "tnormal:64:384:2:1:side"}, "resolution"),
    ({"token_drop": "const:1.5"}, "token_drop"),
    ({"token_drop": "beta:0.9:0.5"}, "token_drop"),
    ({"token_drop": "const:0.1@linear:1:2"}, "token_drop"),
    ({"max_images_per_seq": 0}, "max_images_per_seq"),
    ({"max_tokens_per_image": 300, "seq_len": 256}, "max_tokens_per_image"),
    ({"packer": "magic"}, "packer"),
    ({"seed": -1}, "seed"),
    ({"resize": "lanczos"}, "resize"),
    ({"fill": "exact", "packer": "next-fit"}, "fill"),
    ({"fill": "exact", "packer": "first-fit"}, "fill"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        PackConfig(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_config_json_round_trip_and_defaults():
    cfg = PackConfig(seq_len=512, resolution="uniform:64:256", token_drop="beta:0.3:0.9")
    assert cfg.max_images_per_seq == 32 and cfg.max_tokens_per_image == 512 and cfg.token_dim == 768
    assert PackConfig(**cfg.to_json()) == cfg


def test_config_is_frozen():
    cfg = PackConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seq_len = 5  # type: ignore[misc]
