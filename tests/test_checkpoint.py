"""RTVC-format checkpoints: Resemblyzer's weights load strictly, ours load in Resemblyzer and in
an RTVC-layout model and optimizer, code payloads are refused unrun, and writes are atomic."""

import errno
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import resemblyzer
import torch
from resemblyzer.audio import preprocess_wav, wav_to_mel_spectrogram
from torch import nn

from spkenc.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    load_encoder,
    load_loss_state,
    rtvc_parameters,
    save_checkpoint,
)
from spkenc.config import AudioConfig, ModelConfig, TrainConfig
from spkenc.ge2e import GE2ELoss
from spkenc.model import SpeakerEncoder

torch.set_num_threads(1)

PRETRAINED = Path(resemblyzer.__file__).parent / "pretrained.pt"
TINY = ModelConfig(hidden_size=12, n_layers=3, embedding_size=6)


@pytest.fixture(scope="module")
def demo_wav(demo_files) -> np.ndarray:
    """A real demo utterance, preprocessed by Resemblyzer (16 kHz, normalized, trimmed)."""
    return preprocess_wav(demo_files[0])


@pytest.fixture(scope="module")
def demo_partials(demo_wav) -> torch.Tensor:
    """(2, 160, 40) mel partials of that utterance: its first and last 160 frames."""
    mel = wav_to_mel_spectrogram(demo_wav)
    assert len(mel) >= 160, "the first demo utterance is shorter than one partial"
    return torch.from_numpy(np.stack([mel[:160], mel[-160:]]))


class RTVCEncoder(nn.Module):
    """RTVC's encoder/model.py layout: submodules first in __init__, then w and b registered
    directly on the module (so state_dict() and parameters() list w and b first)."""

    def __init__(self, config: ModelConfig, n_mels: int = 40):
        super().__init__()
        self.lstm = nn.LSTM(n_mels, config.hidden_size, config.n_layers, batch_first=True)
        self.linear = nn.Linear(config.hidden_size, config.embedding_size)
        self.relu = nn.ReLU()
        self.similarity_weight = nn.Parameter(torch.tensor([10.0]))
        self.similarity_bias = nn.Parameter(torch.tensor([-5.0]))


def _trained_tiny(steps: int = 2) -> tuple[SpeakerEncoder, GE2ELoss, torch.optim.Adam]:
    """A tiny encoder and loss after a few Adam steps, so the optimizer has per-parameter state."""
    torch.manual_seed(0)
    encoder, loss_fn = SpeakerEncoder(TINY), GE2ELoss()
    optimizer = torch.optim.Adam(rtvc_parameters(encoder, loss_fn), lr=1e-3)
    for _ in range(steps):
        loss, _ = loss_fn(encoder(torch.rand(3 * 2, 20, 40)).reshape(3, 2, -1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return encoder, loss_fn, optimizer


def test_resemblyzer_pretrained_loads_strictly_and_names_the_skipped_keys(caplog):
    caplog.set_level(logging.INFO, logger="spkenc.checkpoint")
    encoder, info = load_encoder(PRETRAINED)
    assert isinstance(encoder, SpeakerEncoder)
    assert (encoder.config, encoder.n_mels) == (ModelConfig(), 40)
    assert set(info["skipped"]) == {"similarity_weight", "similarity_bias"}
    assert info["skipped"]["similarity_weight"] == pytest.approx(70.8929, abs=1e-3)
    assert info["skipped"]["similarity_bias"] == pytest.approx(-4.1807, abs=1e-3)
    assert info["step"] == 1564501 and info["audio_config"] is None and info["spkenc_format_version"] is None
    skipped_logs = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped_logs) == 1
    assert "similarity_weight" in skipped_logs[0] and "similarity_bias" in skipped_logs[0]
    assert str(PRETRAINED) in skipped_logs[0]
    state = torch.load(PRETRAINED, map_location="cpu", weights_only=True)["model_state"]
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("weights", ["random", "pretrained", "perturbed"])
def test_our_checkpoint_gives_the_same_embeddings_in_resemblyzer(weights, tmp_path, demo_wav, demo_partials):
    torch.manual_seed(3)
    encoder = SpeakerEncoder() if weights == "random" else load_encoder(PRETRAINED)[0]
    if weights == "perturbed":
        with torch.no_grad():
            for param in encoder.parameters():
                param.add_(0.01 * torch.randn_like(param))
    path = save_checkpoint(tmp_path / "encoder.pt", encoder, loss=GE2ELoss(), step=7)
    reference = resemblyzer.VoiceEncoder(device="cpu", verbose=False, weights_fpath=path)
    for key, value in encoder.state_dict().items():
        assert torch.equal(reference.state_dict()[key], value), f"Resemblyzer did not load {key}"
    encoder.eval()
    with torch.no_grad():
        ours, theirs = encoder(demo_partials), reference(demo_partials)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    ours_utterance = _embed_utterance(encoder, demo_wav)
    theirs_utterance = torch.from_numpy(reference.embed_utterance(demo_wav))
    assert float(ours_utterance @ theirs_utterance) > 0.99999
    torch.testing.assert_close(ours_utterance, theirs_utterance, rtol=0, atol=1e-6)


def _embed_utterance(encoder: SpeakerEncoder, wav: np.ndarray) -> torch.Tensor:
    """Resemblyzer's utterance embedding (its partial slicing and padding) with our encoder."""
    wav_slices, mel_slices = resemblyzer.VoiceEncoder.compute_partial_slices(len(wav), rate=1.3, min_coverage=0.75)
    wav = np.pad(wav, (0, max(0, wav_slices[-1].stop - len(wav))))
    mel = wav_to_mel_spectrogram(wav)
    with torch.no_grad():
        partials = encoder(torch.from_numpy(np.stack([mel[s] for s in mel_slices])))
    mean = partials.mean(0)
    return mean / mean.norm()


def test_rtvc_model_and_optimizer_load_our_checkpoint(tmp_path):
    encoder, loss_fn, optimizer = _trained_tiny()
    path = save_checkpoint(tmp_path / "encoder.pt", encoder, loss=loss_fn, optimizer=optimizer, step=2)

    raw = torch.load(path, weights_only=True)
    assert list(raw["model_state"])[:2] == ["similarity_weight", "similarity_bias"]
    assert raw["step"] == 2 and raw["spkenc_format_version"] == FORMAT_VERSION
    assert raw["model_config"] == TINY.to_dict()

    rtvc = RTVCEncoder(TINY)
    rtvc.load_state_dict(raw["model_state"], strict=True)
    rtvc_optimizer = torch.optim.Adam(rtvc.parameters(), lr=1e-4)
    rtvc_optimizer.load_state_dict(raw["optimizer_state"])
    ours = rtvc_parameters(encoder, loss_fn)
    assert len(list(rtvc.parameters())) == len(ours) == 16
    for theirs_param, our_param in zip(rtvc.parameters(), ours):
        assert torch.equal(theirs_param, our_param.detach())
        theirs_state, our_state = rtvc_optimizer.state[theirs_param], optimizer.state[our_param]
        assert torch.equal(theirs_state["exp_avg"], our_state["exp_avg"])
        assert torch.equal(theirs_state["exp_avg_sq"], our_state["exp_avg_sq"])


def test_checkpoint_without_a_loss_still_loads_strictly_in_rtvc(tmp_path):
    encoder = SpeakerEncoder(TINY)
    path = save_checkpoint(tmp_path / "encoder.pt", encoder)
    state = load_checkpoint(path)
    RTVCEncoder(TINY).load_state_dict(state["model_state"], strict=True)
    assert state["optimizer_state"] is None
    assert float(state["model_state"]["similarity_weight"]) == 10.0
    assert float(state["model_state"]["similarity_bias"]) == -5.0


class Payload:
    """Unpickling this creates a marker file: the stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 2"])
def test_a_checkpoint_carrying_code_is_refused_and_never_runs(writer, tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save({"step": 1, "model_state": SpeakerEncoder(TINY).state_dict(), "extra": Payload(marker)}, path)
    else:
        with open(path, "wb") as file:
            pickle.dump({"step": 1, "model_state": {}, "extra": Payload(marker)}, file, protocol=2)

    with pytest.raises(CheckpointError, match="refused.*code or Python objects that are not plain weights") as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value)
    with pytest.raises(CheckpointError, match="refused"):
        load_encoder(path)
    assert not marker.exists()
    # the payload is real: an unrestricted load would have run it
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as file:
            pickle.load(file)
    assert marker.exists()


def test_unusable_files_are_refused_with_the_reason(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", SpeakerEncoder(TINY))
    data = good.read_bytes()
    cases = {
        "truncated.pt": (data[: len(data) // 2], "truncated or corrupt"),
        "empty.pt": (b"", "truncated or corrupt"),
        "text.pt": (b"this is not a checkpoint", "corrupt"),
    }
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=reason) as caught:
            load_checkpoint(tmp_path / name)
        assert str(tmp_path / name) in str(caught.value)
    with pytest.raises(CheckpointError, match="missing.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"step": 3, "weights": {}}, tmp_path / "no_model.pt")
    with pytest.raises(CheckpointError, match=r"no_model.pt: not a checkpoint: no model_state dict \(keys: \['step', 'weights'\]\)"):
        load_checkpoint(tmp_path / "no_model.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt: not a checkpoint: holds a list"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"model_state": {}, "spkenc_format_version": FORMAT_VERSION + 1}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=f"future.pt: spkenc checkpoint format {FORMAT_VERSION + 1}"):
        load_checkpoint(tmp_path / "future.pt")


def test_load_encoder_refuses_any_key_mismatch_other_than_w_and_b():
    state = load_checkpoint(PRETRAINED)
    extra = {**state, "model_state": {**state["model_state"], "lstm.weight_ih_l9_extra": torch.zeros(1)}}
    with pytest.raises(CheckpointError, match=r"<checkpoint dict>: encoder keys do not match: missing \[\], unexpected \['lstm.weight_ih_l9_extra'\]"):
        load_encoder(extra)
    missing = {**state, "model_state": {k: v for k, v in state["model_state"].items() if k != "linear.bias"}}
    with pytest.raises(CheckpointError, match=r"missing \['linear.bias'\], unexpected \[\]"):
        load_encoder(missing)
    misshapen = {**state, "model_state": {**state["model_state"], "lstm.bias_hh_l1": torch.zeros(7)}}
    with pytest.raises(CheckpointError, match="size mismatch for lstm.bias_hh_l1"):
        load_encoder(misshapen)
    no_lstm = {"model_state": {"linear.weight": torch.zeros(4, 4), "linear.bias": torch.zeros(4)}}
    with pytest.raises(CheckpointError, match="key 'lstm.weight_ih_l0' is missing"):
        load_encoder(no_lstm)
    lying = {**state, "model_config": {"hidden_size": 128, "n_layers": 3, "embedding_size": 256}}
    with pytest.raises(CheckpointError, match="stored model_config .* does not match the tensors' shape"):
        load_encoder(lying)


def test_round_trip_of_step_configs_rng_optimizer_and_loss(tmp_path):
    encoder, loss_fn, optimizer = _trained_tiny(steps=3)
    np_rng = np.random.RandomState(5).get_state()
    extra = {
        "rng_state": {"torch": torch.get_rng_state(), "numpy": list(np_rng)},
        "sampler_state": {"seed": 4, "speakers": ["a/1", "b/2"]},
    }
    configs = {"audio_config": AudioConfig(), "model_config": TINY, "train_config": TrainConfig(steps=9, seed=4)}
    path = save_checkpoint(tmp_path / "run" / "encoder.pt", encoder, loss_fn, optimizer, step=3, configs=configs, extra=extra)
    assert sorted(p.name for p in path.parent.iterdir()) == ["encoder.pt"]

    state = load_checkpoint(path)
    assert state["step"] == 3
    assert state["audio_config"] == AudioConfig().to_dict()
    assert TrainConfig.from_dict(state["train_config"]) == TrainConfig(steps=9, seed=4)
    assert state["sampler_state"] == {"seed": 4, "speakers": ["a/1", "b/2"]}
    assert torch.equal(state["rng_state"]["torch"], extra["rng_state"]["torch"])
    kind, keys, pos, has_gauss, cached = state["rng_state"]["numpy"]
    restored = np.random.RandomState()
    restored.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    assert restored.randint(0, 2**31, 5).tolist() == np.random.RandomState(5).randint(0, 2**31, 5).tolist()

    loaded, info = load_encoder(path)
    assert info["step"] == 3 and info["model_config"] == TINY.to_dict() and info["audio_config"] == AudioConfig().to_dict()
    mels = torch.rand(2, 20, 40)
    assert torch.equal(loaded(mels), encoder(mels))
    fresh_loss = GE2ELoss(w_init=1.0, b_init=0.0)
    load_loss_state(state, fresh_loss)
    assert torch.equal(fresh_loss.similarity_weight, loss_fn.similarity_weight)
    assert torch.equal(fresh_loss.similarity_bias, loss_fn.similarity_bias)
    fresh_optimizer = torch.optim.Adam(rtvc_parameters(loaded, fresh_loss), lr=1e-3)
    fresh_optimizer.load_state_dict(state["optimizer_state"])
    for ours, theirs in zip(rtvc_parameters(loaded, fresh_loss), rtvc_parameters(encoder, loss_fn)):
        assert torch.equal(fresh_optimizer.state[ours]["exp_avg_sq"], optimizer.state[theirs]["exp_avg_sq"])
    with pytest.raises(CheckpointError, match=r"no GE2E loss parameters \['similarity_weight', 'similarity_bias'\]"):
        load_loss_state({"model_state": encoder.state_dict()}, fresh_loss)


def test_values_that_need_pickled_code_are_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint value sampler_state\['order'\] is a set"):
        save_checkpoint(tmp_path / "encoder.pt", SpeakerEncoder(TINY), extra={"sampler_state": {"order": {1, 2}}})
    with pytest.raises(ValueError, match=r"extra key\(s\) \['step'\] would overwrite"):
        save_checkpoint(tmp_path / "encoder.pt", SpeakerEncoder(TINY), extra={"step": 5})
    with pytest.raises(ValueError, match="does not match the encoder's"):
        save_checkpoint(tmp_path / "encoder.pt", SpeakerEncoder(TINY), configs={"model_config": ModelConfig()})
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    encoder = SpeakerEncoder(TINY)
    path = save_checkpoint(tmp_path / "encoder.pt", encoder, step=1)
    before = path.read_bytes()
    real_save = torch.save

    def disk_fills_up(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 the first bytes of a zip archive")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_fills_up)
    with pytest.raises(OSError, match="could not write checkpoint .*encoder.pt .*No space left on device.*unchanged") as caught:
        save_checkpoint(path, encoder, step=2)
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.pt"]
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1


def test_checkpoint_files_get_the_umask_mode_and_a_wrong_optimizer_order_is_flagged(tmp_path, caplog):
    umask = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "encoder.pt", SpeakerEncoder(TINY))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    encoder, loss_fn = SpeakerEncoder(TINY), GE2ELoss()
    save_checkpoint(tmp_path / "ok.pt", encoder, loss_fn, torch.optim.Adam(rtvc_parameters(encoder, loss_fn)))
    assert "RTVC cannot load" not in caplog.text
    misordered = torch.optim.Adam([*encoder.parameters(), *loss_fn.parameters()])
    save_checkpoint(tmp_path / "misordered.pt", encoder, loss_fn, misordered)
    assert "not over rtvc_parameters(encoder, loss): RTVC cannot load its optimizer_state" in caplog.text


def test_saving_removes_temporary_files_of_killed_writers_only(tmp_path):
    """A writer killed mid-save leaves `.encoder.pt.<pid>.<hex>.tmp`; the next save removes it,
    but never the temporary file of a writer that is still running."""
    import subprocess
    import sys

    from spkenc.checkpoint import save_checkpoint
    from spkenc.model import SpeakerEncoder

    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True, check=True).stdout)
    dead = tmp_path / f".encoder.pt.{dead_pid}.0123abcd.tmp"
    alive = tmp_path / f".encoder.pt.{os.getppid()}.4567cdef.tmp"
    other = tmp_path / f".other.pt.{dead_pid}.89abcdef.tmp"
    for path in (dead, alive, other):
        path.write_bytes(b"partial")
    save_checkpoint(tmp_path / "encoder.pt", SpeakerEncoder(), step=1)
    assert not dead.exists()
    assert alive.exists() and other.exists()
