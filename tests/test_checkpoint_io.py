"""Tests for sfm.io.params: exact round trips and one-line errors for bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from flax import nnx

from sfm.io.params import load_params, read_config_yaml, save_params
from sfm.io.tensors import CheckpointError, read_tensors, write_tensors


class Counter(nnx.Variable):
    """A non-parameter buffer, as codebook usage counters are."""


class Small(nnx.Module):
    """Parameters in nested modules and lists, a bf16 layer, an int buffer and an RNG stream."""

    def __init__(self, rngs: nnx.Rngs, width: int = 3, depth: int = 2) -> None:
        self.inp = nnx.Linear(2, width, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
        self.half = nnx.Linear(width, 2, param_dtype=jnp.bfloat16, rngs=rngs)
        self.counts = Counter(jnp.arange(5, dtype=jnp.int32))
        self.drop = nnx.Dropout(0.1, rngs=rngs)


def _flat(model: nnx.Module) -> dict[str, np.ndarray]:
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        out["/".join(map(str, path))] = np.asarray(value)
    return out


def _assert_one_line(err: pytest.ExceptionInfo[CheckpointError], path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    return msg


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt" / "small.safetensors"
    save_params(Small(nnx.Rngs(0)), path, "codec:\n  n_q: 4\n")
    return path


def test_round_trip_is_exact_and_keeps_dtypes(saved: Path) -> None:
    expected = _flat(Small(nnx.Rngs(0)))
    other = Small(nnx.Rngs(1))
    assert not np.array_equal(_flat(other)["inp/kernel"], expected["inp/kernel"])
    load_params(other, saved)
    got = _flat(other)
    assert got.keys() == expected.keys()
    assert "blocks/1/kernel" in got and "counts" in got and "drop/rngs/key" in got
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert other.half.kernel.dtype == jnp.bfloat16


def test_config_yaml_in_metadata(saved: Path, tmp_path: Path) -> None:
    assert read_config_yaml(saved) == "codec:\n  n_q: 4\n"
    bare = tmp_path / "bare.safetensors"
    safetensors.serialize_file(
        {"x": {"dtype": "float32", "shape": [1], "data": b"\0" * 4}}, str(bare)
    )
    assert read_config_yaml(bare) is None


@pytest.mark.parametrize("keep", [0.5, 0.999, 20 / 10_000])
def test_truncated_file(saved: Path, tmp_path: Path, keep: float) -> None:
    data = saved.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: max(4, int(len(data) * keep))])
    for fn in (lambda p: load_params(Small(nnx.Rngs(0)), p), read_config_yaml):
        with pytest.raises(CheckpointError) as err:
            fn(cut)
        assert "not a readable safetensors file (truncated or corrupt)" in _assert_one_line(
            err, cut
        )


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    (tmp_path / "text.safetensors").write_text("hello")
    for name, reason in (
        ("absent.safetensors", "no such checkpoint file"),
        ("text.safetensors", "not a readable safetensors file"),
    ):
        with pytest.raises(CheckpointError) as err:
            load_params(Small(nnx.Rngs(0)), tmp_path / name)
        assert reason in _assert_one_line(err, tmp_path / name)


def test_shape_mismatch_names_first_key_and_count(saved: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_params(Small(nnx.Rngs(0), width=4), saved)
    msg = _assert_one_line(err, saved)
    assert "does not match the config" in msg
    assert "'blocks/0/bias' expected shape (4,), found (3,)" in msg
    assert "and 6 other mismatched keys" in msg


def test_missing_key(saved: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_params(Small(nnx.Rngs(0), depth=3), saved)
    msg = _assert_one_line(err, saved)
    assert "does not match the config" in msg
    assert "'blocks/2/bias' is missing (expected shape (3,))" in msg
    assert "and 1 other mismatched keys" in msg


def test_unexpected_key(saved: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_params(Small(nnx.Rngs(0), depth=1), saved)
    msg = _assert_one_line(err, saved)
    assert "unexpected key 'blocks/1/bias'" in msg


def test_failed_load_leaves_model_untouched(saved: Path) -> None:
    model = Small(nnx.Rngs(5), depth=3)
    before = _flat(model)
    with pytest.raises(CheckpointError):
        load_params(model, saved)
    for key, value in _flat(model).items():
        np.testing.assert_array_equal(value, before[key])


@pytest.mark.parametrize(
    "entry, metadata",
    [
        ({"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}, None),
        ({"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}, None),  # int64 wraps
        ({"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}, None),
        ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, None),
        ({"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}, None),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, None),  # size != offsets
        ({"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}, None),  # past the end
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, [1]),
    ],
)
def test_tampered_headers_are_one_line_errors(
    tmp_path: Path, entry: dict, metadata: object
) -> None:
    header = {"w": entry} if metadata is None else {"__metadata__": metadata, "w": entry}
    text = json.dumps(header).encode()
    path = tmp_path / "tampered.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(16))
    for fn in (read_tensors, read_config_yaml):
        with pytest.raises(CheckpointError) as err:
            fn(path)
        assert "not a readable safetensors file" in _assert_one_line(err, path)


def test_tensors_read_are_copies_not_views_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    write_tensors(path, {"w": np.arange(4, dtype=np.float32), "s": np.array(2, np.int32)})
    got = read_tensors(path)
    assert got["s"].shape == () and int(got["s"]) == 2
    path.write_bytes(b"")  # the file changes; what was read does not
    np.testing.assert_array_equal(got["w"], np.arange(4, dtype=np.float32))
