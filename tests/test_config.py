"""Config loading and the errors a user sees for bad input."""

import pytest

from kvbm.config import ConfigError, KVBMConfig, load_config, parse_capacity
from kvbm.blocks import KVLayout

LLAMA8B = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16)


def test_yaml_file_with_env_overrides(tmp_path):
    f = tmp_path / "kvbm.yaml"
    f.write_text(
        "layout: {num_layers: 32, num_kv_heads: 8, head_dim: 128, block_size: 16}\n"
        "tiers:\n"
        "  - {name: g2, capacity: 1GiB, eviction: lru}\n"
        "  - {name: g3, capacity: 100000, eviction: {name: frequency, half_life: 60}, admission: {name: n_hit, n: 3}}\n"
    )
    cfg = load_config(f, env={"KVBM_TIERS__G2__CAPACITY": "2GiB", "KVBM_MODE": "inclusive"})
    # 2 GiB of 2 MiB blocks (32 layers x 2 x 8 heads x 128 dim x 16 tokens x 2 bytes)
    assert LLAMA8B.block_nbytes == 2 * 2**20
    assert cfg.tiers[0].capacity == 1024
    assert cfg.mode == "inclusive"
    assert cfg.tiers[1].eviction.options == {"half_life": 60}
    assert cfg.tiers[1].admission.name == "n_hit" and cfg.tiers[1].admission.options == {"n": 3}


def test_toml_file(tmp_path):
    f = tmp_path / "kvbm.toml"
    f.write_text('mode = "exclusive"\n[[tiers]]\nname = "g2"\ncapacity = 500\neviction = "arc"\n')
    cfg = load_config(f, env={})
    assert cfg.tiers[0].capacity == 500 and cfg.tiers[0].eviction.name == "arc"


def test_env_can_add_a_tier_in_order():
    cfg = load_config(None, env={"KVBM_TIERS__G3__CAPACITY": "50", "KVBM_TIERS__G2__CAPACITY": "10"})
    assert [t.name for t in cfg.tiers] == ["g2", "g3"]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"tiers": [{"name": "g2", "capacity": 0}]}, "tiers.g2.capacity must be at least one block"),
        ({"tiers": [{"name": "g2", "capacity": -5}]}, "tiers.g2.capacity must be at least one block"),
        ({"tiers": [{"name": "g3", "capacity": 5}, {"name": "g2", "capacity": 5}]},
         "tiers are out of order: g2 comes after g3"),
        ({"tiers": [{"name": "g2", "capacity": 5}, {"name": "g2", "capacity": 5}]}, "tier g2 appears twice"),
        ({"tiers": [{"name": "g2", "capacty": 5}]}, "unknown config key tiers[0].'capacty' (did you mean 'capacity'?)"),
        ({"tier": []}, "unknown config key 'tier' (did you mean 'tiers'?)"),
        ({"tiers": [{"name": "g5", "capacity": 5}]}, "tiers[0].name must be one of g1, g2, g3, g4"),
        ({"tiers": [{"name": "g2", "capacity": "4GiB"}]}, "give a `layout`"),
        ({"tiers": [{"name": "g2", "capacity": "4 parsecs"}]}, "unknown unit"),
        ({"tiers": [{"name": "g2", "capacity": 5}], "mode": "both"}, "mode must be 'exclusive' or 'inclusive'"),
        ({"tiers": []}, "tiers must be a non-empty list"),
        ({"tiers": [{"name": "g2", "capacity": 5}], "layout": {"num_layers": 0, "num_kv_heads": 8,
          "head_dim": 128, "block_size": 16}}, "layout.num_layers must be a positive integer"),
    ],
)
def test_bad_config_names_what_to_fix(data, message):
    with pytest.raises(ConfigError) as err:
        KVBMConfig.from_dict(data)
    assert message in str(err.value)


def test_unknown_policy_lists_registered_names():
    from kvbm import BlockManager

    cfg = KVBMConfig.from_dict({"tiers": [{"name": "g2", "capacity": 5, "eviction": "lfu2"}]})
    with pytest.raises(ConfigError) as err:
        BlockManager.from_config(cfg)
    msg = str(err.value)
    assert "tiers.g2.eviction: unknown eviction policy 'lfu2'" in msg
    for name in ("lru", "fifo", "arc", "s3fifo", "frequency", "priority", "prefix"):
        assert name in msg


def test_bad_policy_option_names_the_tier():
    from kvbm import BlockManager

    cfg = KVBMConfig.from_dict({"tiers": [{"name": "g2", "capacity": 5, "eviction": {"name": "lru", "colour": 3}}]})
    with pytest.raises(ConfigError, match=r"tiers.g2.eviction: .*colour"):
        BlockManager.from_config(cfg)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", env={})
    f = tmp_path / "bad.yaml"
    f.write_text("tiers: [{name: g2, capacity: 0}]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml"):
        load_config(f, env={})


def test_capacity_units():
    assert parse_capacity(10, None) == 10
    assert parse_capacity("10_000".replace("_", ""), None) == 10000
    assert parse_capacity("4MiB", LLAMA8B) == 2
    assert parse_capacity("4.2MB", LLAMA8B) == 2
    with pytest.raises(ConfigError):
        parse_capacity("1KiB", LLAMA8B)  # smaller than one block
    with pytest.raises(ConfigError):
        parse_capacity(True, None)
