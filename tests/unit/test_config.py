import tomllib
from pathlib import Path

import pytest

from node.config import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_equals_embedded_defaults():
    shipped = load_settings(REPO / "config" / "node.toml", env={})
    assert shipped.model_dump() == load_settings(env={}).model_dump()


def test_shipped_config_documents_every_setting():
    text = (REPO / "config" / "node.toml").read_text()
    data = tomllib.loads(text)
    for table, model in Settings.model_fields.items():
        assert table in data, f"[{table}] missing from config/node.toml"
        for key in model.annotation.model_fields:
            assert key in data[table], f"{table}.{key} missing from config/node.toml"
            # a comment line precedes each key (possibly after other keys' comments)
            idx = text.index(f"\n{key} =", text.index(f"[{table}]"))
            before = text[:idx].rstrip().splitlines()
            assert any(line.startswith("#") for line in before[-4:]), f"{table}.{key} has no comment"


def test_env_overrides_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[node]\nport = 11113\n[destination]\nhost = "pacs.local"\n')
    s = load_settings(f, env={"DERMNODE_NODE__PORT": "2000"})
    assert s.node.port == 2000 and s.destination.host == "pacs.local"
    assert s.destination.port == 4242  # untouched default


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"DERMNODE_NODE__PORT": "abc"}, "node.port"),
        ({"DERMNODE_NODE__PORT": "70000"}, "node.port"),
        ({"DERMNODE_NODE__AE_TITLE": "X" * 17}, "node.ae_title"),
        ({"DERMNODE_MODEL__DEVICE": "tpu"}, "model.device"),
        ({"DERMNODE_NODE__NO_SUCH_KEY": "1"}, "node.no_such_key: unknown setting"),
        ({"DERMNODE_RETRY__MAX_ATTEMPTS": "0"}, "retry.max_attempts"),
    ],
)
def test_bad_setting_names_the_setting(env, needle):
    with pytest.raises(ConfigError) as e:
        load_settings(env=env)
    assert needle in str(e.value)


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[node]\nportt = 1\n")
    with pytest.raises(ConfigError, match="node.portt: unknown setting"):
        load_settings(f, env={})


def test_invalid_toml(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(f, env={})
