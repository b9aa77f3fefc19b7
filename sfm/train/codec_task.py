"""`train.task: codec`: adversarial training of the Mimi codec (settings in `codec_train`).

One loss, one backward pass, one optimizer for both players:

    loss = L_gen(codec, stop_gradient(disc)) + L_disc(disc, stop_gradient(reconstruction))

so the discriminator's parameters get exactly the gradient of L_disc and the codec's exactly
that of L_gen (adversarial hinge + feature matching + mel + commitment + distillation). The
codebooks are EMA statistics (`CodebookStat`) that the loss updates and the step returns.
Data are random crops of `codec_train.segment_seconds` from speech corpora.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfm.codec import losses as L
from sfm.codec.discriminator import MultiDiscriminator
from sfm.codec.model import Mimi
from sfm.codec.quantizer import CodebookStat
from sfm.nn.linear import Linear
from sfm.train.step import LossFn

if TYPE_CHECKING:
    from sfm.config import Config

log = logging.getLogger(__name__)
Metrics = dict[str, jax.Array]


class CodecTrainModel(nnx.Module):
    """What the codec run trains: the codec, the discriminators and the distillation head."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs) -> None:
        tcfg = cfg.codec_train
        self.codec = Mimi(cfg.codec, rngs=rngs)
        self.disc = MultiDiscriminator(tcfg.disc, rngs=rngs)
        dim = cfg.codec.seanet.dimension
        self.distill_proj = nnx.data(
            Linear(dim, tcfg.teacher_dim, axes=("embed", None), rngs=rngs)
            if tcfg.teacher != "none"
            else None
        )


@dataclasses.dataclass
class Forward:
    """The codec's training pass: reconstruction, commitment loss, distillation, metrics."""

    recon: jax.Array
    commit: jax.Array
    distill: jax.Array
    metrics: Metrics


def codec_forward(
    model: CodecTrainModel, wav_bt: jax.Array, key: jax.Array, teacher: L.Teacher | None
) -> Forward:
    """Mimi's training pass (EMA codebook updates included) plus semantic distillation: the
    first RVQ's straight-through quantized output, projected, against the teacher."""
    codec = model.codec
    latent = codec.encode_latent(wav_bt)
    q = codec.quantizer.train_forward(latent, codec.cfg.n_q, key)
    recon = codec.decode_latent(q.quantized)[:, : wav_bt.shape[1]]
    distill = jnp.zeros((), jnp.float32)
    if teacher is not None and model.distill_proj is not None:
        rvq, ns = codec.quantizer.rvq_first, codec.cfg.quantizer.n_q_semantic
        x = rvq.input_proj(latent)
        qv = sum(rvq.layers[i].decode(q.codes_bkt[:, i]) for i in range(ns))
        semantic = rvq.output_proj(x + jax.lax.stop_gradient(qv - x))
        distill = L.distill_loss(model.distill_proj(semantic), teacher(wav_bt))
    return Forward(recon, q.commit_loss, distill, dict(q.metrics))


def frozen(module: nnx.Module) -> nnx.Module:
    """A copy of `module` whose parameters are stop-gradient constants."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def codec_losses(
    model: CodecTrainModel,
    wav_bt: jax.Array,
    key: jax.Array,
    cfg: Config,
    teacher: L.Teacher | None = None,
    one_pass: bool = True,
) -> tuple[jax.Array, jax.Array, Metrics]:
    """(L_gen, L_disc, metrics). With `one_pass` L_gen sees the discriminator's parameters
    as constants and L_disc the reconstruction, so grad(L_gen + L_disc) trains each player
    on its own loss; without, both are the plain losses (for checking that)."""
    tcfg, w = cfg.codec_train, cfg.codec_train.weights
    sg = jax.lax.stop_gradient if one_pass else (lambda x: x)
    fwd = codec_forward(model, wav_bt, key, teacher)
    real_logits, real_feats = model.disc(wav_bt)
    fake_logits, _ = model.disc(sg(fwd.recon))
    l_disc = L.hinge_disc_loss(real_logits, fake_logits)
    gen_logits, gen_feats = (frozen(model.disc) if one_pass else model.disc)(fwd.recon)
    mel = L.mel_loss(wav_bt, fwd.recon, cfg.codec.sample_rate, tcfg.mel_scales)
    terms = {
        "adv": L.hinge_gen_loss(gen_logits),
        "feat": L.feature_matching_loss(real_feats, gen_feats),
        "mel": mel if w.mel else jax.lax.stop_gradient(mel),
        "commit": fwd.commit,
    }
    if teacher is not None:
        terms["distill"] = fwd.distill
    l_gen = sum(getattr(w, k) * v for k, v in terms.items())
    metrics = {
        **terms,
        **fwd.metrics,
        "gen": l_gen,
        "disc": l_disc,
        "disc_acc": L.disc_accuracy(real_logits, fake_logits),
    }
    return l_gen, w.disc * l_disc, metrics


def make_loss_fn(cfg: Config) -> LossFn:
    """The train step's loss: L_gen + L_disc in one pass (see `codec_losses`)."""
    teacher = L.make_teacher(
        cfg.codec_train.teacher, cfg.codec.sample_rate, cfg.codec_train.teacher_dim
    )

    def loss_fn(model: Any, batch: dict[str, jax.Array], rng: jax.Array) -> Any:
        l_gen, l_disc, metrics = codec_losses(model, batch["wav"], rng, cfg, teacher)
        return l_gen + l_disc, metrics

    return loss_fn


@nnx.jit
def _roundtrip(codec: Mimi, wav_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The first row of a batch and its encode-decode reconstruction."""
    wav = wav_bt[:1]
    return wav, codec.decode(codec.encode(wav))[:, : wav.shape[1]]


class CodecTask:
    """The Task protocol (sfm.train.tasks) for codec training."""

    def build_model(self, cfg: Config) -> nnx.Module:
        """Codec (from `train.init_from` when given), discriminators, distillation head."""
        model = CodecTrainModel(cfg, rngs=nnx.Rngs(cfg.seed))
        if cfg.train.init_from:
            from sfm.io.codec import build_codec

            nnx.update(model.codec, nnx.state(build_codec(cfg, cfg.train.init_from)))
        return model

    def trainable(self, cfg: Config) -> Any:
        return nnx.Param

    def mutable(self, cfg: Config) -> Any:
        return CodebookStat

    def loss_fn(self, cfg: Config) -> LossFn:
        return make_loss_fn(cfg)

    def dataset(self, cfg: Config) -> Any:
        return build_dataset(cfg)

    def device_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"wav": host_batch["wav"]}

    def batch_shapes(self, cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch the step takes: crops float32 [batch, samples]."""
        return {
            "wav": jax.ShapeDtypeStruct((cfg.data.batch_size, segment_samples(cfg)), np.float32)
        }

    def cost(self, cfg: Config) -> tuple[int, float]:
        """(audio samples per step, FLOPs per step: not counted, 0)."""
        return cfg.data.batch_size * segment_samples(cfg), 0.0

    def export(self, cfg: Config, model: nnx.Module, out_dir: Path) -> Path:
        """`out_dir/codec.safetensors`: the codec's weights and codebooks with the run's config."""
        from sfm.config import dump_yaml
        from sfm.io.params import save_params

        path = out_dir / "codec.safetensors"
        if jax.process_index() == 0:
            save_params(model.codec, path, dump_yaml(cfg))  # type: ignore[attr-defined]
        return path

    def log_samples(self, writer: Any, step: int, model: nnx.Module, batch: dict[str, Any]) -> None:
        """One real example, its reconstruction and both log-mel spectrograms to TensorBoard
        (computed on every process, written where `writer` is not None)."""
        from jax.experimental import multihost_utils

        pair = _roundtrip(model.codec, batch["wav"])  # type: ignore[attr-defined]
        real, recon = (
            np.asarray(multihost_utils.process_allgather(x, tiled=True))[0] for x in pair
        )
        if writer is None:
            return
        sr = model.codec.cfg.sample_rate  # type: ignore[attr-defined]
        for name, wav in (("real", real), ("reconstructed", recon)):
            writer.add_audio(f"samples/{name}", np.clip(wav, -1, 1), step, sample_rate=sr)
            writer.add_image(
                f"spectrogram/{name}", spectrogram_image(wav, sr), step, dataformats="HWC"
            )


def segment_samples(cfg: Config) -> int:
    """Samples per training crop."""
    return round(cfg.codec_train.segment_seconds * cfg.codec.sample_rate)


def spectrogram_image(wav: np.ndarray, sample_rate: int, colormap: str = "magma") -> np.ndarray:
    """A log-mel spectrogram as an RGB float image [mels, frames, 3], low bands at the bottom."""
    import matplotlib

    from sfm.codec.mel import log_mel

    mel = np.asarray(log_mel(jnp.asarray(wav, jnp.float32)[None], sample_rate, 1024, 80))[0].T[::-1]
    lo, hi = mel.max() - 4.0, mel.max()  # 80 dB of range
    scaled = np.clip((mel - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    cmap: Callable[[np.ndarray], np.ndarray] = matplotlib.colormaps[colormap]
    return cmap(scaled)[..., :3].astype(np.float32)


# ---- data -------------------------------------------------------------------------------


class Crops:
    """Random mono crops of `samples` from the clips of WAV corpora and tfds splits.

    A clip is ("wav", path, frames, channels, rate) or ("tfds", source index, example index);
    a crop starts anywhere in its clip, takes one random channel and is zero-padded when
    the clip is shorter. Picklable (for grain worker processes) while sources are."""

    def __init__(self, clips: list[tuple], sources: list[Any], samples: int, rate: int) -> None:
        self.clips, self.sources, self.samples, self.rate = clips, sources, samples, rate

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        clip = self.clips[index]
        wav = self._wav(clip, rng) if clip[0] == "wav" else self._tfds(clip, rng)
        out = np.zeros(self.samples, np.float32)
        out[: len(wav)] = wav[: self.samples]
        return {"wav": out}

    def _start(self, frames: int, rng: np.random.Generator) -> int:
        return int(rng.integers(0, max(frames - self.samples, 0) + 1))

    def _wav(self, clip: tuple, rng: np.random.Generator) -> np.ndarray:
        import soundfile as sf

        from sfm.data.audio import load_audio

        _, path, frames, channels, rate = clip
        channel = int(rng.integers(channels))
        if rate != self.rate:  # resample the whole file, then crop
            wav = load_audio(path, self.rate, channel=channel)
            start = self._start(len(wav), rng)
            return wav[start : start + self.samples]
        start = self._start(frames, rng)
        data, _ = sf.read(path, start=start, frames=self.samples, dtype="float32", always_2d=True)
        return data[:, channel]

    def _tfds(self, clip: tuple, rng: np.random.Generator) -> np.ndarray:
        audio = np.asarray(self.sources[clip[1]][clip[2]]["audio"])  # int16 [T, C]
        channel = int(rng.integers(audio.shape[1]))
        start = self._start(audio.shape[0], rng)
        return audio[start : start + self.samples, channel].astype(np.float32) / 32768.0


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")  # what soundfile reads without extra codecs


def _clips(paths: Any, where: Path, what: str) -> list[tuple]:
    """("wav", path, frames, channels, rate) of each readable file `paths` yields; a path that
    cannot be had (None: a bad manifest line) or read is counted and logged once for `where`."""
    import soundfile as sf

    clips, skipped = [], 0
    for path in paths:
        try:
            if path is None:
                raise ValueError("bad manifest line")
            info = sf.info(str(path))
        except Exception:  # bad line, missing, corrupt or not audio alike
            skipped += 1
            continue
        clips.append(("wav", str(path), info.frames, info.channels, info.samplerate))
    if skipped:
        log.warning("%s: skipped %d %s", where, skipped, what)
    return clips


def _manifest_paths(manifest: Path) -> Any:
    """The audio path of each non-blank manifest line (relative to it), None for a bad line."""
    import json

    for line in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                yield manifest.parent / json.loads(line)["path"]  # an absolute path stays
            except (ValueError, KeyError, TypeError):
                yield None


def _wav_clips(manifest: Path) -> list[tuple]:
    """The readable clips of a manifest (bad lines and unreadable audio are logged, skipped)."""
    return _clips(_manifest_paths(manifest), manifest, "bad or unreadable entries")


def _folder_clips(folder: Path) -> list[tuple]:
    """The readable clips of every audio file under `folder` (unreadable ones logged, skipped)."""
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
    return _clips(files, folder, "unreadable audio files")


def corpus_clips(paths: tuple[str, ...], split: str) -> tuple[list[tuple], list[Any]]:
    """(clips, tfds sources) of every `codec_train.corpus` entry, in order."""
    from sfm.data.pipeline import DataError

    if not paths:
        raise DataError("codec_train.corpus: empty; name corpus directories, e.g. [data/corpus]")
    clips: list[tuple] = []
    sources: list[Any] = []
    for entry in paths:
        p = Path(entry)
        manifest = p if p.is_file() else p / "manifest.jsonl"
        if manifest.is_file():
            clips += _wav_clips(manifest)
            continue
        import tensorflow_datasets as tfds

        info_dirs = sorted({d.parent for d in p.rglob("dataset_info.json")})
        if not info_dirs and p.is_dir():
            clips += _folder_clips(p)
            continue
        if not info_dirs:
            raise DataError(f"codec_train.corpus: {entry}: no such corpus, folder or tfds dir")
        for d in info_dirs:
            source = tfds.builder_from_directory(str(d)).as_data_source(split)
            clips += [("tfds", len(sources), i) for i in range(len(source))]
            sources.append(source)
    if not clips:
        raise DataError(f"codec_train.corpus: no readable audio in {', '.join(paths)}")
    return clips, sources


def build_dataset(cfg: Config) -> Any:
    """This host's rows of each global batch of `data.batch_size` crops, {"wav": [b, samples]};
    a deterministic function of the seed and the step, so the iterator checkpoints."""
    import grain

    from sfm.data.pipeline import HostRows, _ensure_absl_flags, host_shard

    clips, sources = corpus_clips(cfg.codec_train.corpus, cfg.codec_train.split)
    seed = cfg.data.seed or cfg.seed
    crops = Crops(clips, sources, segment_samples(cfg), cfg.codec.sample_rate)
    ds = grain.MapDataset.range(len(clips)).shuffle(seed=seed).repeat()
    rows = HostRows(ds.random_map(crops, seed=seed + 1), cfg.data.batch_size, host_shard(cfg.data))
    it = rows.to_iter_dataset().batch(rows.rows, drop_remainder=True)
    if cfg.data.num_workers > 0:
        _ensure_absl_flags()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.num_workers))
    return it
