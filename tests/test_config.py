"""Typed configs: presets, dotted overrides, one-line errors naming the key, YAML round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from sfm.codec.config import CodecConfig, CodecTransformerConfig, QuantizerConfig, SeanetConfig
from sfm.config import (
    Config,
    ConfigError,
    dump_yaml,
    load_config,
    load_stored_config,
    parse_override,
    resolve_preset,
)
from sfm.parallel.config import DEFAULT_RULES, MeshConfig
from sfm.typed import from_dict, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MIMI = CONFIGS / "codec" / "mimi.yaml"
TINY = CONFIGS / "codec" / "tiny.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- presets --------------------------------------------------------------------------------


def test_mimi_preset_equals_defaults() -> None:
    assert load_config(MIMI, []) == Config()
    assert load_config(MIMI, []).codec == CodecConfig()


def test_mimi_preset_writes_every_field() -> None:
    written = yaml.safe_load(MIMI.read_text())["codec"]
    defaults = to_dict(CodecConfig())

    def keys(tree: dict, prefix: str = "") -> set[str]:
        out = set()
        for name, value in tree.items():
            out |= keys(value, f"{prefix}{name}.") if isinstance(value, dict) else {prefix + name}
        return out

    assert keys(written) == keys(defaults)


def test_tiny_preset() -> None:
    codec = load_config(TINY, []).codec
    assert codec == CodecConfig(
        frame_rate=50.0,
        n_q=4,
        seanet=SeanetConfig(dimension=32, n_filters=8, ratios=(5, 4, 4, 3)),
        transformer=CodecTransformerConfig(
            d_model=32, num_heads=2, num_layers=2, dim_feedforward=64, context=16
        ),
        quantizer=QuantizerConfig(dimension=16, total_codebooks=4, bins=64),
    )
    assert (codec.seanet.hop_length, codec.resample_stride, codec.frame_size) == (240, 2, 480)
    assert isinstance(codec.frame_rate, float)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("single", (1, 1, 1)), ("fsdp8", (1, 8, 1)), ("dp2_fsdp2_tp2", (2, 2, 2))],
)
def test_mesh_presets(name: str, shape: tuple[int, ...]) -> None:
    cfg = load_config(CONFIGS / "mesh" / f"{name}.yaml", [])
    assert cfg.mesh.ici_shape == shape
    assert cfg.mesh.dcn_shape == (1, 1, 1)
    assert cfg.mesh.rules == DEFAULT_RULES
    assert cfg.codec == CodecConfig()


def test_no_path_gives_defaults() -> None:
    assert load_config(None, []) == Config()


# --- overrides ------------------------------------------------------------------------------


def test_parse_override_reads_yaml_values() -> None:
    assert parse_override("codec.n_q=4") == ("codec.n_q", 4)
    assert parse_override("codec.transformer.layer_scale=0.5") == (
        "codec.transformer.layer_scale",
        0.5,
    )
    assert parse_override("codec.seanet.true_skip=false") == ("codec.seanet.true_skip", False)
    assert parse_override("codec.seanet.ratios=[8,6,5,4]") == ("codec.seanet.ratios", [8, 6, 5, 4])
    assert parse_override("mesh.rules.kv=null") == ("mesh.rules.kv", None)
    assert parse_override("codec.transformer.norm_eps=1e-6") == ("codec.transformer.norm_eps", 1e-6)
    assert parse_override("codec.param_dtype=yes") == ("codec.param_dtype", "yes")


def test_overrides_scalars_nested_and_lists() -> None:
    cfg = load_config(
        TINY,
        [
            "codec.n_q=2",
            "codec.seanet.ratios=[4, 4, 5, 3]",
            "codec.transformer.norm_eps=1e-6",
            "codec.frame_rate=25",
            "seed=7",
        ],
    )
    assert cfg.codec.n_q == 2
    assert cfg.codec.seanet.ratios == (4, 4, 5, 3)
    assert cfg.codec.seanet.n_filters == 8  # the rest of the preset is kept
    assert cfg.codec.transformer.norm_eps == 1e-6
    assert cfg.codec.frame_rate == 25.0 and isinstance(cfg.codec.frame_rate, float)
    assert cfg.seed == 7


def test_override_without_preset_keeps_sibling_defaults() -> None:
    cfg = load_config(None, ["codec.quantizer.bins=1024"])
    assert cfg == Config(codec=CodecConfig(quantizer=QuantizerConfig(bins=1024)))


def test_override_one_rule_by_name() -> None:
    cfg = load_config(None, ["mesh.rules.batch=[data]", "mesh.rules.kv=[tensor]"])
    rules = dict(cfg.mesh.rules)
    assert rules["batch"] == ("data",)
    assert rules["kv"] == ("tensor",)
    assert len(cfg.mesh.rules) == len(DEFAULT_RULES)


def test_override_whole_rules_as_mapping_or_pairs() -> None:
    as_mapping = load_config(None, ["mesh.rules={batch: [data, fsdp], kv: null}"])
    as_pairs = load_config(None, ["mesh.rules=[[batch, [data, fsdp]], [kv, null]]"])
    expected = (("batch", ("data", "fsdp")), ("kv", None))
    assert as_mapping.mesh.rules == as_pairs.mesh.rules == expected


def test_same_override_twice_with_same_value_is_fine() -> None:
    assert load_config(None, ["seed=1", "seed=1"]).seed == 1


# --- errors ---------------------------------------------------------------------------------


def one_line_error(path: Path | str | None, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_suggests_the_close_one() -> None:
    message = one_line_error(TINY, ["codec.seanet.n_filterz=8"])
    assert message == "codec.seanet.n_filterz: unknown key (did you mean n_filters?)"


def test_unknown_top_level_key() -> None:
    assert one_line_error(None, ["sede=1"]).startswith("sede: unknown key")


def test_unknown_key_in_preset(tmp_path: Path) -> None:
    preset = write(tmp_path / "p.yaml", "codec:\n  quantizer:\n    binz: 4\n")
    assert one_line_error(preset, []).startswith("codec.quantizer.binz: unknown key")


def test_wrong_type_names_key_and_value() -> None:
    assert one_line_error(None, ["codec.n_q=four"]) == "codec.n_q: expected int, got str 'four'"


@pytest.mark.parametrize("value", ["yes", "1", "'true'"])
def test_bool_is_strict(value: str) -> None:
    message = one_line_error(None, [f"codec.seanet.true_skip={value}"])
    assert message.startswith("codec.seanet.true_skip: expected bool")


def test_int_field_rejects_float_and_bool() -> None:
    assert one_line_error(None, ["codec.n_q=8.0"]).startswith("codec.n_q: expected int, got float")
    assert one_line_error(None, ["codec.n_q=true"]).startswith("codec.n_q: expected int, got bool")


def test_wrong_list_item_names_its_index() -> None:
    message = one_line_error(None, ["codec.seanet.ratios=[8, six, 5, 4]"])
    assert message == "codec.seanet.ratios[1]: expected int, got str 'six'"


def test_wrong_rule_names_the_rule() -> None:
    message = one_line_error(None, ["mesh.rules.batch=data"])
    assert message.startswith("mesh.rules.batch: expected tuple[str, ...]")


def test_section_preset_swaps_the_whole_section_then_dotted_overrides_apply() -> None:
    recipe = CONFIGS / "train" / "moshi_7b_duplex_lora.yaml"
    cfg = load_config(recipe, ["lm=tiny", "lm.dtype=float32", "mesh=single", "codec=tiny"])
    tiny = load_config(CONFIGS / "lm" / "tiny.yaml")
    assert dataclasses.replace(cfg.lm, dtype=tiny.lm.dtype) == tiny.lm  # nothing of the 7B left
    assert cfg.lm.dtype == "float32"
    assert cfg.codec == tiny.codec  # the codec preset's section, its own base merged in
    assert cfg.mesh == load_config(CONFIGS / "mesh" / "single.yaml").mesh
    assert (cfg.train.lora_rank, cfg.data.seq_len) == (128, 1250)  # the recipe's other sections


def test_section_preset_errors_name_the_override() -> None:
    assert one_line_error(None, ["lm=tinyy"]).startswith("tinyy: no such config file or lm preset")
    assert one_line_error(None, ["lm=tiny", "lm=small"]).startswith("lm: conflicting overrides")
    assert one_line_error(None, ["mesh=" + str(TINY)]).startswith(f"mesh={TINY}: ")


def test_post_init_check_becomes_config_error() -> None:
    message = one_line_error(TINY, ["codec.n_q=5"])
    assert message.startswith("codec.n_q: 5 must lie in [1, 4]")


def test_conflicting_overrides() -> None:
    message = one_line_error(None, ["codec.n_q=4", "codec.n_q=2"])
    assert message.startswith("codec.n_q: conflicting overrides")


def test_override_inside_an_overridden_value_conflicts() -> None:
    message = one_line_error(None, ["mesh.rules={kv: null}", "mesh.rules.batch=[data]"])
    assert message.startswith("mesh.rules.batch: conflicting overrides")


def test_override_inside_a_scalar() -> None:
    assert one_line_error(None, ["seed.x=1"]).startswith("seed.x: cannot set a key inside seed")


@pytest.mark.parametrize("text", ["codec.n_q", "=4", "codec..n_q=4", "codec n_q=4"])
def test_malformed_override(text: str) -> None:
    with pytest.raises(ConfigError, match="expected an override KEY=VALUE"):
        parse_override(text)


def test_missing_file_names_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert one_line_error(missing, []) == f"{missing}: no such config file"


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    preset = write(tmp_path / "bad.yaml", "codec:\n  n_q: 4\n  seanet: [1, 2\n")
    message = one_line_error(preset, [])
    assert message.startswith(f"{preset}:4:")
    assert "bad YAML" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    preset = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    assert one_line_error(preset, []).startswith(f"{preset}: expected a mapping")


def test_section_must_be_a_mapping() -> None:
    message = one_line_error(None, ["codec=4"])
    assert message == "codec: expected a mapping of CodecConfig fields, got int 4"


# --- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides", [[], ["mesh.rules=[[batch, [data]], [kv, null]]", "codec.param_dtype=yes"]]
)
def test_dump_load_round_trip(tmp_path: Path, overrides: list[str]) -> None:
    cfg = load_config(TINY, overrides)
    dumped = write(tmp_path / "dumped.yaml", dump_yaml(cfg))
    assert load_config(dumped, []) == cfg
    assert from_dict(Config, to_dict(cfg)) == cfg


def test_to_dict_writes_rules_as_a_mapping() -> None:
    rules = to_dict(MeshConfig())["rules"]
    assert rules["batch"] == ["data", "fsdp"]
    assert rules["kv"] is None


def test_dump_is_readable_yaml() -> None:
    text = dump_yaml(load_config(TINY, []))
    assert "ratios: [5, 4, 4, 3]" in text
    assert "batch: [data, fsdp]" in text


# --- inheritance ----------------------------------------------------------------------------


def test_base_is_deep_merged(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", "seed: 3\ncodec:\n  n_q: 4\n  seanet:\n    n_filters: 16\n")
    child = write(
        tmp_path / "sub" / "child.yaml",
        "base: ../base.yaml\ncodec:\n  seanet:\n    kernel_size: 5\n",
    )
    cfg = load_config(child, [])
    assert cfg.seed == 3
    assert cfg.codec.n_q == 4
    assert cfg.codec.seanet == SeanetConfig(n_filters=16, kernel_size=5)


def test_base_list_combines_presets(tmp_path: Path) -> None:
    preset = write(
        tmp_path / "run.yaml",
        f"base: [{TINY}, {CONFIGS / 'mesh' / 'fsdp8.yaml'}]\nseed: 5\n",
    )
    cfg = load_config(preset, ["codec.n_q=3"])
    assert cfg.codec == dataclasses.replace(load_config(TINY, []).codec, n_q=3)
    assert cfg.mesh.ici_shape == (1, 8, 1)
    assert cfg.seed == 5


def test_base_cycle_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    assert "inheritance cycle" in one_line_error(tmp_path / "a.yaml", [])


def test_missing_base_names_its_path(tmp_path: Path) -> None:
    preset = write(tmp_path / "p.yaml", "base: gone.yaml\n")
    assert one_line_error(preset, []) == f"{tmp_path / 'gone.yaml'}: no such config file"


# --- generic machinery ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Inner:
    name: str
    weight: float | None = None


@dataclasses.dataclass(frozen=True)
class _Outer:
    inner: _Inner
    sizes: tuple[int, int] = (1, 2)
    tags: tuple[str, ...] = ()


def test_from_dict_is_generic() -> None:
    built = from_dict(_Outer, {"inner": {"name": "a", "weight": 2}, "sizes": [3, 4]})
    assert built == _Outer(inner=_Inner(name="a", weight=2.0), sizes=(3, 4))
    assert from_dict(_Outer, {"inner": {"name": "a", "weight": None}}).inner.weight is None
    assert from_dict(_Outer, to_dict(built)) == built


def test_from_dict_errors_on_missing_required_and_wrong_length() -> None:
    with pytest.raises(ConfigError, match=r"^inner\.name: missing required key$"):
        from_dict(_Outer, {"inner": {}})
    with pytest.raises(ConfigError, match=r"^x\.sizes: expected 2 items"):
        from_dict(_Outer, {"inner": {"name": "a"}, "sizes": [1, 2, 3]}, prefix="x")


@pytest.mark.parametrize(
    "preset", sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
)
def test_every_preset_loads(preset: str) -> None:
    cfg = load_config(CONFIGS / preset)
    assert from_dict(Config, to_dict(cfg)) == cfg


def test_resolve_preset_finds_files_and_names() -> None:
    assert resolve_preset("tiny", "codec") == CONFIGS / "codec" / "tiny.yaml"
    assert resolve_preset("tiny_pretrain", "train") == CONFIGS / "train" / "tiny_pretrain.yaml"
    path = CONFIGS / "lm" / "moshi_7b.yaml"
    assert resolve_preset(str(path), "train") == path
    with pytest.raises(ConfigError) as err:
        resolve_preset("nope", "codec")
    assert str(err.value) == "nope: no such config file or codec preset (presets: mimi, tiny)"


def test_configs_stored_by_older_versions_still_load() -> None:
    """Checkpoints store their run's whole config; keys that moved are dropped on reading."""
    old = to_dict(load_config(TINY))
    old["data"] |= {"n_q": 8, "delays": [0] * 17}
    cfg = load_stored_config(
        yaml.safe_dump(old, sort_keys=False), "old.safetensors", ["codec.n_q=2"]
    )
    assert cfg == load_config(TINY, ["codec.n_q=2"])
    with pytest.raises(ConfigError) as err:
        load_stored_config(
            yaml.safe_dump(old, sort_keys=False), "old.safetensors", ["codec.nope=1"]
        )
    assert str(err.value).startswith("old.safetensors (stored config): codec.nope: unknown key")
    with pytest.raises(ConfigError) as err:  # a moved key is dropped from the file, not from
        load_stored_config(yaml.safe_dump(old), "old.safetensors", ["data.n_q=4"])  # the user
    assert str(err.value) == "data.n_q: no longer a setting: the LM's lm.n_q is used"


def test_sampling_is_a_checked_section_stored_with_the_run() -> None:
    """Runs built on the tiny LM sample audio over half its 64-entry codebooks; a run saved
    without the section samples with Moshi's defaults; bad values name their key."""
    tiny = load_config(resolve_preset("tiny", "lm"), ["sampling.temp_text=1.0"])
    assert (tiny.sampling.top_k, tiny.sampling.temp_text, tiny.sampling.top_k_text) == (32, 1.0, 25)
    stored = to_dict(tiny)
    assert load_stored_config(yaml.safe_dump(stored), "run").sampling == tiny.sampling
    del stored["sampling"]
    assert load_stored_config(yaml.safe_dump(stored), "run").sampling.top_k == 250
    for bad in ("sampling.temp_text=-1", "sampling.top_k=-2", "sampling.temp=.nan"):
        with pytest.raises(ConfigError, match=rf"^{bad.split('=')[0]}: must be a number >= 0"):
            load_config(None, [bad])


def test_a_preset_setting_a_moved_key_is_told_where_it_went(tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("data: {n_q: 4}\n")
    with pytest.raises(ConfigError) as err:
        load_config(preset)
    assert str(err.value) == "data.n_q: no longer a setting: the LM's lm.n_q is used"


def test_codec_transformer_width_must_match_the_seanet_dimension() -> None:
    with pytest.raises(ConfigError, match=r"^codec.transformer.d_model: 512 must equal"):
        load_config(None, ["codec.seanet.dimension=256"])
