"""The recipes of launch/README.md run as written, at test scale.

Each test reads its recipe's commands from the document (so the doc cannot drift from what
works), creates small local stand-ins for the files they name (a tiny Mimi and Moshi in
Kyutai's layout, a tokenizer, synthetic conversations, tokenized shards, an audio folder),
appends test-size overrides (`lm=tiny`, `codec=tiny`, a few steps) and runs them: `sfm`
commands through the CLI's entry point, the pod launcher as a process with a stand-in
`gcloud` that runs every worker on this machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from flax import nnx

from sfm.cli import main
from sfm.config import load_config, resolve_preset
from sfm.io.params import load_params
from sfm.io.weights import load_weights

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "launch" / "README.md"


def recipe(title: str) -> list[str]:
    """The commands of the bash block under `### title`, continuation lines joined."""
    text = README.read_text()
    match = re.search(rf"^### {re.escape(title)}\n.*?```bash\n(.*?)```", text, re.S | re.M)
    assert match, f"launch/README.md: no bash block under '### {title}'"
    return [line for line in match.group(1).replace("\\\n", " ").splitlines() if line.strip()]


def run_sfm(command: str, *extra: str) -> str:
    """Run one documented `sfm ...` command (plus test-size arguments) in this process."""
    argv = shlex.split(command)
    assert argv[0] == "sfm", command
    assert main([*argv[1:], *extra]) == 0, f"failed: {command}"
    return command


# The tiny LM with a text vocabulary of `text_card` and a depth MLP moshi's layout can hold
# (moshi derives the gated width as 2/3 of dim_feedforward; tiny's 128 gives no integer match).
MOSHI_TINY = ("lm=tiny", "lm.depth.dim_feedforward=96")


def tiny_lm_config(text_card: int) -> object:
    overrides = [*MOSHI_TINY[1:], f"lm.text_card={text_card}"]
    return load_config(resolve_preset("tiny", "lm"), overrides).lm


# ---------------------------------------------------------------- fine-tune Moshi

TEXT_CARD = 128  # the stand-in tokenizer's vocabulary


@pytest.fixture(scope="module")
def moshi_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding what a Moshi fine-tuner starts from, at tiny scale: conversations in
    moshi-finetune's layout (train.jsonl), Mimi and Moshi weights in Kyutai's layout and a
    SentencePiece tokenizer."""
    from sfm.codec.model import Mimi
    from sfm.data.dialogues import synth_dialogues
    from sfm.data.tokenizer import train_tokenizer, training_texts
    from sfm.io.mimi import export_mimi
    from sfm.io.moshi_lm import export_moshi_lm
    from sfm.lm.model import LM

    root = tmp_path_factory.mktemp("release")
    synth_dialogues(root / "conversations", minutes=0.5, seed=0)
    (root / "conversations" / "manifest.jsonl").rename(root / "conversations" / "train.jsonl")
    texts = training_texts([root / "conversations"], [])
    model = train_tokenizer(texts, root / "spm", TEXT_CARD)
    shutil.copy(model, root / "tokenizer_spm_32k_3.model")
    codec_cfg = load_config(resolve_preset("tiny", "codec")).codec
    export_mimi(Mimi(codec_cfg, rngs=nnx.Rngs(1)), root / "mimi.safetensors")
    export_moshi_lm(LM(tiny_lm_config(TEXT_CARD), rngs=nnx.Rngs(2)), root / "moshi.safetensors")
    return root


def test_finetune_moshi_on_your_conversations(
    moshi_release: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenize, train, export = recipe("Fine-tune Moshi on your conversations")
    monkeypatch.chdir(moshi_release)
    run_sfm(tokenize, "--config", "tiny", "--batch-size", "4")
    assert sorted(Path("tokens").glob("train-*.array_record"))
    run_sfm(
        train,
        *MOSHI_TINY,
        f"lm.text_card={TEXT_CARD}",
        "data.seq_len=32",
        "train.steps=3",
        "train.lora_rank=4",
        "train.log_every=1",
        "train.optim.warmup_steps=1",
    )
    run = Path("runs/my_moshi")
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()] == [1, 2, 3]
    run_sfm(export)

    exported = Path("my_moshi")
    config = json.loads((exported / "config.json").read_text())
    assert config["moshi_name"] == "model.safetensors"
    assert config["tokenizer_name"] == "tokenizer_spm_32k_3.model"
    assert (exported / config["tokenizer_name"]).read_bytes() == Path(
        "tokenizer_spm_32k_3.model"
    ).read_bytes()
    assert (exported / config["mimi_name"]).is_file()
    from sfm.lm.model import LM

    tuned = LM(tiny_lm_config(TEXT_CARD), rngs=nnx.Rngs(0))
    assert load_weights(tuned, exported / "model.safetensors") == "moshi-lm"
    merged = LM(tiny_lm_config(TEXT_CARD), rngs=nnx.Rngs(0))
    load_params(merged, run / "lm.safetensors")
    base = LM(tiny_lm_config(TEXT_CARD), rngs=nnx.Rngs(0))
    load_weights(base, "moshi.safetensors")
    flat = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(tuned, nnx.Param))}
    want = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(merged, nnx.Param))}
    start = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
    assert flat.keys() == want.keys()
    for k in flat:
        np.testing.assert_array_equal(flat[k], want[k], err_msg=str(k))
    # LoRA trained and merged: some linear moved away from Moshi's weights, no embedding did
    moved = [k for k in flat if not np.array_equal(flat[k], start[k])]
    assert moved and all("kernel" in "/".join(map(str, k)) for k in moved), moved


# ---------------------------------------------------------------- pretrain on a pod

FAKE_GCLOUD = """#!{python}
# Stands in for `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=SCRIPT`: runs
# SCRIPT once per worker, each in its own home folder, as one jax.distributed process of a
# pod on localhost; SIGTERM (a preemption) is passed on to worker POD_SIGTERM_WORKER only,
# so the others must learn of it from the training loop.
import os, signal, subprocess, sys

args = sys.argv[1:]
assert args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in args, args
script = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
root, workers = os.environ["POD_ROOT"], int(os.environ["POD_WORKERS"])
procs = []
for i in range(workers):
    home = os.path.join(root, f"worker-{{i}}")
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ, SFM_PROCESS_ID=str(i), SFM_NUM_PROCESSES=str(workers))
    log = open(os.path.join(home, "log"), "a")
    procs.append(subprocess.Popen(["bash", "-c", script], cwd=home, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True))
victim = procs[int(os.environ["POD_SIGTERM_WORKER"])]
signal.signal(signal.SIGTERM, lambda *_: os.killpg(victim.pid, signal.SIGTERM))
with open(os.path.join(root, "gcloud.pid"), "w") as f:
    f.write(str(os.getpid()))
sys.exit(max(p.wait() for p in procs))
"""


@pytest.fixture(scope="module")
def shared_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenized text and speech shards where the recipe puts them (/mnt/shared here)."""
    from sfm.data.tokenize import write_shard
    from sfm.data.tokenize_text import text_record_bytes
    from sfm.testing.records import speech_record

    shared = tmp_path_factory.mktemp("shared")
    rng = np.random.default_rng(0)
    kw = {"n_q": 4, "card": 64, "text_vocab": 64, "p_pad": 0.4, "p_epad": 0.1}
    speech = [
        speech_record(rng, 1, int(rng.integers(40, 90)), **kw, path=f"u{j}.wav") for j in range(24)
    ]
    text = [text_record_bytes(rng.integers(4, 64, 64).astype(np.int32)) for _ in range(24)]
    (shared / "tokens" / "speech").mkdir(parents=True)
    write_shard(
        shared / "tokens" / "speech" / "train-00000-of-00001.array_record", speech, "group_size:1"
    )
    write_shard(shared / "tokens" / "text-00000-of-00001.array_record", text, "group_size:1")
    return shared


def _metric_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.open()] if path.exists() else []


def test_pretrain_on_a_pod_and_resume_after_preemption(
    shared_storage: Path, tmp_path: Path
) -> None:
    first, again = recipe("Pretrain on a pod"), None
    assert len(first) == 1
    command = first[0].replace("/mnt/shared", str(shared_storage))
    steps = 60
    extra = [
        "lm=tiny",
        "data.seq_len=32",
        "data.batch_size=8",
        f"train.steps={steps}",
        "train.ckpt_every=1000",
        "train.log_every=1",
        "train.async_checkpoint=false",
    ]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "POD_ROOT": str(tmp_path / "pod"),
        "POD_WORKERS": "2",
        "POD_SIGTERM_WORKER": "1",
        "REPO": str(ROOT),
        "SETUP": f"ln -sfn {sys.prefix} .venv",  # this environment, not a new one
        "SFM_COORDINATOR": f"127.0.0.1:{_free_port()}",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }
    argv = [
        *shlex.split(command.replace("launch/tpu_pod.sh", str(ROOT / "launch/tpu_pod.sh"))),
        *extra,
    ]
    assignments = [a for a in argv if re.fullmatch(r"[A-Z_]+=.*", a)]
    argv = argv[len(assignments) :]
    env.update(a.split("=", 1) for a in assignments)
    run = shared_storage / "runs" / "pretrain"

    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 600
    while len(_metric_steps(run)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, _logs(tmp_path, proc)
    os.kill(int((tmp_path / "pod" / "gcloud.pid").read_text()), signal.SIGTERM)  # preemption
    assert proc.wait(timeout=300) == 0, _logs(tmp_path, proc)
    stopped = _metric_steps(run)
    assert 3 <= len(stopped) < steps and (run / "checkpoints" / str(stopped[-1])).is_dir()
    # only worker 1 was signalled; worker 0 (which logs) stopped at the same step
    assert "stopped by SIGTERM" in (tmp_path / "pod" / "worker-0" / "log").read_text()

    env["SFM_COORDINATOR"] = f"127.0.0.1:{_free_port()}"
    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0, _logs(tmp_path, again)
    log0 = (tmp_path / "pod" / "worker-0" / "log").read_text()
    assert f"resumed from {run / 'checkpoints'} at step {stopped[-1]}" in log0
    assert _metric_steps(run) == list(range(1, steps + 1))  # each step logged once
    assert (run / "lm.safetensors").is_file()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _logs(tmp_path: Path, proc: object) -> str:
    logs = [p.read_text()[-2000:] for p in sorted((tmp_path / "pod").glob("worker-*/log"))]
    return "\n---\n".join([str(getattr(proc, "stdout", "") or ""), *logs])


# ---------------------------------------------------------------- train a codec


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Speech-like 24 kHz clips in nested folders (no manifest) and one held-out file."""
    from sfm.testing.moshi_reference import speech_like

    root = tmp_path_factory.mktemp("codec_recipe")
    clips = speech_like(7, 1.0, seed=3)
    for i, clip in enumerate(clips[:6]):
        (root / "audio" / f"speaker{i % 2}").mkdir(parents=True, exist_ok=True)
        sf.write(root / "audio" / f"speaker{i % 2}" / f"clip{i}.wav", clip, 24000)
    sf.write(root / "held_out.wav", clips[6], 24000)
    return root


def test_train_a_codec(
    audio_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    train, roundtrip = recipe("Train a codec")
    monkeypatch.chdir(audio_folder)
    tiny = load_config(resolve_preset("tiny_codec", "train"))
    run_sfm(
        train,
        "codec=tiny",
        "codec.quantizer.q_dropout=true",
        "data.batch_size=8",
        f"codec_train.segment_seconds={tiny.codec_train.segment_seconds}",
        f"codec_train.mel_scales={[list(s) for s in tiny.codec_train.mel_scales]}",
        f"codec_train.disc.n_ffts={list(tiny.codec_train.disc.n_ffts)}",
        f"codec_train.disc.filters={tiny.codec_train.disc.filters}",
        f"codec_train.disc.dilations={list(tiny.codec_train.disc.dilations)}",
        "train.steps=2",
        "train.log_every=1",
    )
    assert _metric_steps(Path("runs/my_mimi")) == [1, 2]
    capsys.readouterr()
    run_sfm(roundtrip)
    report = capsys.readouterr().out
    assert re.search(r"SI-SDR\s+-?\d+\.\d+ dB", report), report
    assert re.search(r"codebooks \(n_q\)\s+4\b", report), report  # the trained tiny codec
