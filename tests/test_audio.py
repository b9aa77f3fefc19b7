"""Tests for sfm.data.audio: resampling, channel handling, and one-line errors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sfm.data.audio import AudioError, NonFiniteAudioError, load_audio, save_audio


def _sine(freq: float, rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wav: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(wav.size)))
    return float(np.fft.rfftfreq(wav.size, 1 / rate)[np.argmax(spectrum)])


def _assert_one_line(err: pytest.ExceptionInfo[AudioError], path: Path, reason: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    assert reason in msg


@pytest.mark.parametrize("rate", [16000, 44100, 22050, 24000])
def test_resampling_keeps_frequency_and_length_ratio(tmp_path: Path, rate: int) -> None:
    path = tmp_path / "sine.wav"
    sf.write(path, _sine(440.0, rate, 1.0), rate, subtype="FLOAT")
    wav = load_audio(path, sample_rate=24000)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(wav.size - 24000) <= 1
    assert abs(_peak_hz(wav, 24000) - 440.0) < 2.0
    assert 0.45 < np.abs(wav[1000:-1000]).max() < 0.55


def test_stereo_is_averaged_and_channel_selects(tmp_path: Path) -> None:
    left, right = _sine(300.0, 24000, 0.5), _sine(900.0, 24000, 0.5)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 24000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), (left + right) / 2, atol=1e-6)
    np.testing.assert_allclose(load_audio(path, channel=0), left, atol=1e-6)
    np.testing.assert_allclose(load_audio(path, channel=1), right, atol=1e-6)


def test_channel_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    sf.write(path, np.zeros((100, 2), np.float32), 24000)
    with pytest.raises(AudioError) as err:
        load_audio(path, channel=2)
    _assert_one_line(err, path, "channel 2 out of range")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError) as err:
        load_audio(path)
    _assert_one_line(err, path, "no such file")


def test_text_file_named_wav(tmp_path: Path) -> None:
    path = tmp_path / "text.wav"
    path.write_text("this is not audio\n")
    with pytest.raises(AudioError) as err:
        load_audio(path)
    _assert_one_line(err, path, "not a readable audio file")


@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
def test_truncated_wav(tmp_path: Path, subtype: str) -> None:
    full = tmp_path / "full.wav"
    sf.write(full, _sine(440.0, 24000, 1.0), 24000, subtype=subtype)
    data = full.read_bytes()
    path = tmp_path / "cut.wav"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError) as err:
        load_audio(path)
    _assert_one_line(err, path, "truncated")


def test_truncated_inside_header(tmp_path: Path) -> None:
    full = tmp_path / "full.wav"
    sf.write(full, _sine(440.0, 24000, 0.1), 24000)
    path = tmp_path / "cut.wav"
    path.write_bytes(full.read_bytes()[:30])
    with pytest.raises(AudioError) as err:
        load_audio(path)
    _assert_one_line(err, path, "not a readable audio file")


def test_empty_wav(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), 24000)
    with pytest.raises(AudioError) as err:
        load_audio(path)
    _assert_one_line(err, path, "empty audio")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("channels", [1, 2])
def test_non_finite_samples(tmp_path: Path, bad: float, channels: int) -> None:
    path = tmp_path / "nan.wav"
    wav = np.stack([_sine(440.0, 24000, 0.1)] * channels, axis=1)
    wav[100, channels - 1] = bad  # float WAVs keep NaN/Inf; in any channel it is caught
    sf.write(path, wav, 24000, subtype="FLOAT")
    for channel in (None, 0):
        with pytest.raises(NonFiniteAudioError) as err:
            load_audio(path, channel=channel)
        _assert_one_line(err, path, "NaN or Inf")


def test_save_audio_round_trip_and_clip(tmp_path: Path) -> None:
    wav = _sine(440.0, 24000, 0.2) * 3.0
    pcm, flt = tmp_path / "sub" / "pcm.wav", tmp_path / "float.wav"
    save_audio(pcm, wav, 24000)
    save_audio(flt, wav, 24000, subtype="FLOAT")
    assert sf.info(pcm).subtype == "PCM_16"
    assert np.abs(load_audio(pcm)).max() <= 1.0
    np.testing.assert_allclose(load_audio(flt), wav, atol=1e-6)
