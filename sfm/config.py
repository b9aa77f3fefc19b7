"""Typed, frozen configuration: YAML presets in configs/, dotted overrides, one-line errors.

A config is a tree of frozen dataclasses. `load_config` reads a YAML preset (which may name
`base:` presets to inherit from), applies `key.sub=value` overrides and builds the tree with
`sfm.typed.from_dict`, which checks every key and value and names the full dotted key when
one is wrong.

YAML here is YAML 1.1 "safe" with two 1.2 habits: only true/false are booleans (`yes`, `on`
stay strings) and `1e-5` is a float. A field typed `tuple[tuple[str, X], ...]` (such as
`mesh.rules`) may be written as a mapping `{name: x, ...}` or as a list of pairs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, overload

import yaml

from sfm.codec.config import CodecConfig
from sfm.data.config import SOURCES, DataConfig
from sfm.errors import ConfigError
from sfm.infer.config import ServeConfig
from sfm.lm.config import LMConfig, SamplingConfig
from sfm.parallel.config import MeshConfig
from sfm.train.config import CodecTrainConfig, TrainConfig
from sfm.typed import describe, from_dict, plain_defaults, to_dict

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs. A new section is a new field holding a frozen dataclass."""

    codec: CodecConfig = CodecConfig()
    lm: LMConfig = LMConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    codec_train: CodecTrainConfig = CodecTrainConfig()
    mesh: MeshConfig = MeshConfig()
    serve: ServeConfig = ServeConfig()
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0


# --- YAML dialect -------------------------------------------------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)


def _core_scalars(base: type[yaml.SafeLoader | yaml.SafeDumper]) -> dict[Any, list]:
    """`base`'s implicit resolvers with true/false-only booleans and exponent floats."""
    resolvers = {
        first: [(tag, rx) for tag, rx in pairs if tag not in (_BOOL_TAG, _FLOAT_TAG)]
        for first, pairs in base.yaml_implicit_resolvers.items()
    }
    for tag, regexp, firsts in (
        (_BOOL_TAG, _BOOL_RE, "tTfF"),
        (_FLOAT_TAG, _FLOAT_RE, "-+0123456789."),
    ):
        for first in firsts:
            resolvers.setdefault(first, []).append((tag, regexp))
    return resolvers


class _Loader(yaml.SafeLoader):
    """Safe YAML reading true/false (only) as booleans and 1e-5 as a float."""

    yaml_implicit_resolvers = _core_scalars(yaml.SafeLoader)


class _Dumper(yaml.SafeDumper):
    """Quotes exactly the strings that `_Loader` would read as something else."""

    yaml_implicit_resolvers = _core_scalars(yaml.SafeDumper)


def _represent_list(dumper: _Dumper, data: list) -> yaml.Node:
    """Lists of scalars on one line (`ratios: [8, 6, 5, 4]`), mappings always in block style."""
    flow = not any(isinstance(item, (list, dict)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line saying what is wrong in the YAML, without the multi-line source excerpt."""
    if isinstance(err, yaml.MarkedYAMLError):
        return err.problem or err.context or "syntax error"
    return str(err).splitlines()[0]


def dump_yaml(cfg: Any) -> str:
    """`cfg` as YAML that `load_config` reads back into an equal config."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


# --- presets and overrides ----------------------------------------------------------------

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_preset(spec: str | os.PathLike[str], kind: str) -> Path:
    """A config file: `spec` as a path (or relative to the repository), else a preset of
    `kind` (a folder of configs/: codec, lm, train, mesh) by name, e.g. ("tiny", "codec") ->
    configs/codec/tiny.yaml."""
    spec = os.fspath(spec)
    folder = PRESET_DIR / kind
    for path in (Path(spec), PRESET_DIR.parent / spec, folder / spec, folder / f"{spec}.yaml"):
        if path.is_file():
            return path
    presets = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none found"
    raise ConfigError(f"{spec}: no such config file or {kind} preset (presets: {presets})")


_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse_override(text: str) -> tuple[str, Any]:
    """`"codec.n_q=4"` -> `("codec.n_q", 4)`; the value is read as YAML (`[8, 6]`, `null`)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not _KEY_RE.fullmatch(key):
        raise ConfigError(f"{text!r}: expected an override KEY=VALUE such as codec.n_q=4")
    try:
        return key, yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot read value {raw!r}: {_yaml_problem(err)}") from err


@overload
def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config: ...


@overload
def load_config(
    path: str | os.PathLike[str] | None, overrides: Sequence[str], cls: type[T]
) -> T: ...


def load_config(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = (), cls: type = Config
) -> Any:
    """Reads the YAML preset at `path` (None: defaults), applies overrides, builds `cls`.

    `SECTION=NAME` (SECTION one of SECTION_PRESETS) first swaps that whole section for the
    same section of a preset (`lm=tiny`: the `lm` of configs/lm/tiny.yaml), so a real recipe
    runs at test scale; dotted overrides (`lm.dtype=float32`) then apply on top."""
    raw = _read_preset(Path(path)) if path is not None else {}
    sections, dotted = _section_presets(overrides)
    for name, spec in sections.items():
        raw[name] = _preset_section(spec, name)
    defaults = plain_defaults(cls)
    for key, value in _parse_overrides(dotted).items():
        _apply_override(raw, key, value, defaults)
    if cls is Config:
        _refuse_moved_keys(raw)
    cfg = from_dict(cls, raw)
    if isinstance(cfg, Config):
        check_local_paths(cfg)
    return cfg


def check_local_paths(cfg: Config) -> None:
    """Refuse URLs (gs://, s3://) in the paths a run reads and writes: shards, corpora and run
    folders are plain files, so a bucket is mounted on every host (gcsfuse, Filestore) and
    given by its mounted path. (Stored configs are not checked: they only describe a model.)"""
    paths = [(f"data.{s}_paths", p) for s in SOURCES for p in getattr(cfg.data, f"{s}_paths")]
    paths += [("codec_train.corpus", p) for p in cfg.codec_train.corpus]
    paths += [
        (f"train.{n}", getattr(cfg.train, n)) for n in ("out_dir", "init_from", "init_text_from")
    ]
    for key, path in paths:
        if path and "://" in path:
            raise ConfigError(
                f"{key}: {path} is a URL; mount the bucket on every host (e.g. gcsfuse) and "
                "give the mounted path"
            )


# Sections an override may replace by a preset's: `lm=tiny`, `codec=mimi`, `mesh=fsdp8`.
SECTION_PRESETS: tuple[str, ...] = ("codec", "lm", "mesh")


def _section_presets(overrides: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """({section: preset name} of the `SECTION=NAME` overrides, the other overrides)."""
    sections: dict[str, str] = {}
    rest: list[str] = []
    for text in overrides:
        key, value = parse_override(text)
        if key not in SECTION_PRESETS or not isinstance(value, str):
            rest.append(text)
        elif sections.setdefault(key, value) != value:
            raise ConfigError(f"{key}: conflicting overrides {sections[key]!r} and {value!r}")
    return sections, rest


def _preset_section(spec: str, name: str) -> dict[str, Any]:
    """The `name` section of the preset `spec` (a configs/<name>/ preset or a YAML path)."""
    path = resolve_preset(spec, name)
    section = _read_preset(path).get(name)
    if not isinstance(section, dict):
        raise ConfigError(f"{name}={spec}: {path} has no {name} section")
    return section


# Keys that older versions of sfm wrote (a checkpoint stores its run's whole config) and the
# setting that replaced each. A stored config drops them; a preset that sets one is told.
MOVED_KEYS: dict[str, str] = {"data.n_q": "lm.n_q", "data.delays": "lm.delays"}


def _moved_keys_set(raw: Mapping[str, Any]) -> Iterator[tuple[Any, str, str]]:
    """(section node, name, key) of each key of MOVED_KEYS that `raw` sets."""
    for key in MOVED_KEYS:
        section, _, name = key.rpartition(".")
        node = raw.get(section)
        if isinstance(node, Mapping) and name in node:
            yield node, name, key


def _refuse_moved_keys(raw: Mapping[str, Any]) -> None:
    """A preset or override that sets a key of MOVED_KEYS is told which setting replaced it."""
    for _, _, key in _moved_keys_set(raw):
        raise ConfigError(f"{key}: no longer a setting: the LM's {MOVED_KEYS[key]} is used")


def load_stored_config(text: str, source: str, overrides: Sequence[str] = ()) -> Config:
    """The config YAML stored in a checkpoint (`source` names it in errors), keys of older
    versions dropped (MOVED_KEYS), with `overrides` applied."""
    try:
        raw = yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: bad stored config: {_yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: bad stored config: expected a mapping, got {describe(raw)}")
    for node, name, _ in list(_moved_keys_set(raw)):
        node.pop(name)
    defaults = plain_defaults(Config)
    for key, value in _parse_overrides(overrides).items():  # the user's: errors name the key
        _apply_override(raw, key, value, defaults)
    _refuse_moved_keys(raw)  # only an override can set one now
    try:
        return from_dict(Config, raw)
    except ConfigError as err:
        raise ConfigError(f"{source} (stored config): {err}") from None


def _read_preset(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The preset's data deep-merged over the presets its `base:` names (relative paths)."""
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError(f"{path}: base: inheritance cycle through {path.name}")
    data = _read_yaml(path)
    merged: dict[str, Any] = {}
    for base in _base_paths(data.pop("base", None), path):
        merged = _deep_merge(merged, _read_preset(base, (*chain, resolved)))
    return _deep_merge(merged, data)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror}") from err
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{_yaml_location(path, err)}: bad YAML: {_yaml_problem(err)}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {describe(data)}")
    return data


def _yaml_location(path: Path, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


def _base_paths(base: Any, path: Path) -> list[Path]:
    if base is None:
        return []
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        got = describe(base)
        raise ConfigError(f"{path}: base: expected a path or a list of paths, got {got}")
    return [path.parent / b for b in bases]


def _deep_merge(under: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` laid on `under`: mappings merge key by key, anything else replaces."""
    merged = dict(under)
    for name, value in over.items():
        below = merged.get(name)
        if isinstance(below, Mapping) and isinstance(value, Mapping):
            merged[name] = _deep_merge(dict(below), value)
        else:
            merged[name] = value
    return merged


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Parsed overrides; one key given twice with different values, or a key and a key
    inside it (`mesh.rules=...` with `mesh.rules.batch=...`), is an error."""
    parsed: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        if key in parsed and (type(parsed[key]), parsed[key]) != (type(value), value):
            raise ConfigError(f"{key}: conflicting overrides {parsed[key]!r} and {value!r}")
        parsed[key] = value
    for key in parsed:
        parts = key.split(".")
        for depth in range(1, len(parts)):
            outer = ".".join(parts[:depth])
            if outer in parsed:
                raise ConfigError(f"{key}: conflicting overrides ({outer} is set as well)")
    return parsed


def _apply_override(raw: dict[str, Any], key: str, value: Any, defaults: Mapping[str, Any]) -> None:
    """Sets dotted `key` in `raw`; a section missing from `raw` starts from its defaults."""
    parts = key.split(".")
    node: dict[str, Any] = raw
    default: Any = defaults
    for depth, part in enumerate(parts[:-1]):
        default = default.get(part) if isinstance(default, Mapping) else None
        child = _section(node.get(part), default, key, ".".join(parts[: depth + 1]))
        node[part] = child
        node = child
    node[parts[-1]] = value


def _section(current: Any, default: Any, key: str, name: str) -> dict[str, Any]:
    """The mapping found (or started) at `name` so that `key` can be set inside it."""
    if isinstance(current, dict):
        return current
    if current is None:
        if isinstance(default, Mapping):
            return copy.deepcopy(dict(default))
        if default is None:
            return {}
        current = default
    if _is_pair_list(current):
        return {pair[0]: pair[1] for pair in current}
    raise ConfigError(f"{key}: cannot set a key inside {name}, which is {describe(current)}")


def _is_pair_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) for p in value
    )
