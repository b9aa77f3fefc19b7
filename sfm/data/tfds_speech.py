"""TFDS builders for moshi-finetune speech corpora: records are validated, split and stored.

A corpus (sfm.data.corpus: a manifest and 24 kHz WAVs with word alignments) of mono
utterances goes to `SpeechUtterances`, of stereo dialogues (left = model, right = user) to
`SpeechDialogues`. Bad records are skipped and counted by reason in `BadRecords`; nothing in
the corpus can crash preparation. Data is written as ArrayRecord and read without
TensorFlow through `builder.as_data_source(split)`:

    builder, bad = prepare("corpus/", "tfds_data/", stereo=False)
    print(bad)
    train = builder.as_data_source("train")  # len() and random access; Text comes as bytes

Command line: `python -m sfm.data.tfds_speech SOURCE_DIR DATA_DIR [--stereo]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from sfm.data.audio import PathLike
from sfm.data.corpus import (
    SAMPLE_RATE,
    BadRecord,
    BadRecords,
    CorpusError,
    Record,
    Word,
    load_audio_tc,
    scan_corpus,
)

BAD_RECORDS_FILE = "bad_records.json"

# ---------------------------------------------------------------- splits and examples


def _hash_fraction(key: str) -> float:
    """Stable pseudo-random number in [0, 1) from a record key."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16**12


def split_records(records: Sequence[Record], validation_fraction: float) -> dict[str, list[Record]]:
    """Split by path hash; with >= 2 records each split gets at least one."""
    ranked = sorted(records, key=lambda r: _hash_fraction(r.key))
    n_val = sum(_hash_fraction(r.key) < validation_fraction for r in ranked)
    if len(ranked) >= 2:
        n_val = min(max(n_val, 1), len(ranked) - 1)
    val_keys = {r.key for r in ranked[:n_val]}
    return {
        "train": [r for r in records if r.key not in val_keys],
        "validation": [r for r in records if r.key in val_keys],
    }


def to_example(key: str, words: Sequence[Word], audio_tc: np.ndarray) -> dict[str, Any]:
    """The stored example: audio int16 [T, C], rate, duration, path and word timings."""
    return {
        "audio": audio_tc,
        "sample_rate": SAMPLE_RATE,
        "duration": audio_tc.shape[0] / SAMPLE_RATE,
        "path": key,
        "words": {
            "word": [w[0] for w in words],
            "start": [w[1] for w in words],
            "end": [w[2] for w in words],
            "speaker": [w[3] for w in words],
        },
    }


def example_features(channels: int) -> tfds.features.FeaturesDict:
    """Feature spec shared by the corpus builders and the LibriSpeech conversion."""
    return tfds.features.FeaturesDict(
        {
            "audio": tfds.features.Tensor(shape=(None, channels), dtype=np.int16),
            "sample_rate": np.int32,
            "duration": np.float32,
            "path": tfds.features.Text(),
            "words": tfds.features.Sequence(
                {
                    "word": tfds.features.Text(),
                    "start": np.float32,
                    "end": np.float32,
                    "speaker": tfds.features.Text(),
                }
            ),
        }
    )


# ---------------------------------------------------------------- builders


class _SpeechCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared builder: a moshi-finetune directory in, train/validation ArrayRecord out."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    CHANNELS: ClassVar[int] = 1
    # tfds looks for a checksums file beside the builder's code through importlib_resources,
    # which is not installed; a builder that downloads nothing needs no checksums.
    code_path: ClassVar[None] = None

    def __init__(
        self, *, source_dir: PathLike, validation_fraction: float = 0.05, **kwargs: Any
    ) -> None:
        self.source_dir = Path(source_dir)
        self.validation_fraction = validation_fraction
        self.bad_records = BadRecords()
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=example_features(self.CHANNELS),
            metadata=tfds.core.MetadataDict(sample_rate=SAMPLE_RATE),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict]]]:
        del dl_manager
        records, self.bad_records = scan_corpus(self.source_dir, self.CHANNELS)
        if not records:
            raise CorpusError(f"{self.source_dir}: no usable records\n{self.bad_records}")
        splits = split_records(records, self.validation_fraction)
        # tfds refuses empty splits: with a single good record there is no validation split.
        return {name: self._generate_examples(recs) for name, recs in splits.items() if recs}

    def _generate_examples(self, records: list[Record]) -> Iterator[tuple[str, dict]]:
        for record in records:
            try:  # checked already; a file changed since then is skipped, not fatal
                audio = load_audio_tc(record.path, self.CHANNELS)
            except BadRecord as b:
                self.bad_records.add(b)
                continue
            yield record.key, to_example(record.key, record.words, audio)


class SpeechUtterances(_SpeechCorpus):
    """Mono 24 kHz utterances with word timings (moshi-finetune layout)."""

    CHANNELS = 1


class SpeechDialogues(_SpeechCorpus):
    """Stereo 24 kHz dialogues (left = model, right = user) with word timings."""

    CHANNELS = 2


def prepare(
    source_dir: PathLike,
    data_dir: PathLike,
    stereo: bool = False,
    validation_fraction: float = 0.05,
) -> tuple[_SpeechCorpus, BadRecords]:
    """Prepare (or reuse) a corpus as ArrayRecord; returns the builder and the bad records."""
    cls = SpeechDialogues if stereo else SpeechUtterances
    builder = cls(
        source_dir=source_dir, validation_fraction=validation_fraction, data_dir=str(data_dir)
    )
    summary_path = Path(builder.data_dir) / BAD_RECORDS_FILE
    if summary_path.is_file():  # prepared before: tfds skips work, the summary is on disk
        return builder, BadRecords.from_json(json.loads(summary_path.read_text()))
    builder.download_and_prepare()
    summary_path = Path(builder.data_dir) / BAD_RECORDS_FILE
    summary_path.write_text(json.dumps(builder.bad_records.to_json(), indent=1))
    return builder, builder.bad_records


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare a corpus from the command line and print the bad-record summary."""
    ap = argparse.ArgumentParser(prog="python -m sfm.data.tfds_speech", description=__doc__)
    ap.add_argument("source_dir", help="directory with manifest.jsonl (or a manifest file)")
    ap.add_argument("data_dir", help="tfds data directory to write to")
    ap.add_argument("--stereo", action="store_true", help="stereo dialogues (default: mono)")
    ap.add_argument("--validation-fraction", type=float, default=0.05)
    args = ap.parse_args(argv)
    try:
        builder, bad = prepare(
            args.source_dir, args.data_dir, args.stereo, args.validation_fraction
        )
    except CorpusError as e:
        print(e)
        return 1
    for split, info in builder.info.splits.items():
        print(f"{split}: {info.num_examples} examples")
    print(bad)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
