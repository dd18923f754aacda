"""The speaker encoder: output contract, edge cases, FLOP count, and parity with Resemblyzer."""

from pathlib import Path

import numpy as np
import pytest
import resemblyzer
import torch
from resemblyzer.audio import preprocess_wav, wav_to_mel_spectrogram
from torch.utils.flop_counter import FlopCounterMode

from spkenc.config import ModelConfig
from spkenc.model import SpeakerEncoder, count_flops, infer_model_config

torch.set_num_threads(1)

PRETRAINED = Path(resemblyzer.__file__).parent / "pretrained.pt"
SMALL = ModelConfig(hidden_size=32, n_layers=2, embedding_size=16)


@pytest.fixture(scope="module")
def real_partials(demo_files) -> torch.Tensor:
    """(3, 160, 40) overlapping mel partials (start, middle, end) of a real demo utterance,
    made by Resemblyzer's front end."""
    for path in demo_files:
        mel = wav_to_mel_spectrogram(preprocess_wav(path))
        if len(mel) >= 240:
            starts = (0, (len(mel) - 160) // 2, len(mel) - 160)
            return torch.from_numpy(np.stack([mel[start : start + 160] for start in starts]))
    pytest.fail("no demo utterance has 240 mel frames of speech")


def test_embeddings_are_unit_length_and_non_negative():
    torch.manual_seed(0)
    encoder = SpeakerEncoder(SMALL)
    embeds = encoder(torch.rand(5, 50, 40))
    assert embeds.shape == (5, 16) and embeds.dtype == torch.float32
    torch.testing.assert_close(embeds.norm(dim=1), torch.ones(5))
    assert (embeds >= 0).all()
    assert encoder.device == torch.device("cpu")


def test_submodules_follow_rtvc_names_and_shapes():
    encoder = SpeakerEncoder(ModelConfig(hidden_size=24, n_layers=3, embedding_size=12), n_mels=20)
    assert [name for name, _ in encoder.named_children()] == ["lstm", "linear", "relu"]
    assert encoder.lstm.batch_first and encoder.lstm.input_size == 20 and encoder.lstm.num_layers == 3
    assert (encoder.linear.in_features, encoder.linear.out_features) == (24, 12)
    assert not any("similarity" in key for key in encoder.state_dict())


def test_dead_relu_gives_a_zero_embedding_not_nan():
    encoder = SpeakerEncoder(SMALL)
    with torch.no_grad():
        encoder.linear.weight.zero_()
        encoder.linear.bias.fill_(-1.0)
    mels = torch.rand(3, 20, 40, requires_grad=True)
    embeds = encoder(mels)
    assert torch.equal(embeds, torch.zeros(3, 16))
    embeds.sum().backward()
    assert torch.isfinite(mels.grad).all()


def test_silent_input_gives_finite_embeddings():
    embeds = SpeakerEncoder(SMALL)(torch.zeros(2, 40, 40))
    assert torch.isfinite(embeds).all()
    assert (embeds >= 0).all()


def test_bad_shapes_and_sizes_are_refused():
    encoder = SpeakerEncoder(SMALL)
    with pytest.raises(ValueError, match=r"expects \(batch, frames, 40\) mels, got shape \(10, 40\)"):
        encoder(torch.zeros(10, 40))
    with pytest.raises(ValueError, match=r"got shape \(2, 10, 80\)"):
        encoder(torch.zeros(2, 10, 80))
    with pytest.raises(ValueError, match="hidden_size must be at least 1, got 0"):
        SpeakerEncoder(ModelConfig(hidden_size=0))


def test_from_state_dict_infers_the_shape_and_loads_strictly():
    torch.manual_seed(1)
    source = SpeakerEncoder(ModelConfig(hidden_size=12, n_layers=2, embedding_size=7), n_mels=9)
    rebuilt = SpeakerEncoder.from_state_dict(source.state_dict())
    assert (rebuilt.config, rebuilt.n_mels) == (source.config, 9)
    mels = torch.rand(2, 15, 9)
    assert torch.equal(rebuilt(mels), source(mels))

    state = source.state_dict()
    state["lstm.weight_hh_l0"] = torch.zeros(48, 5)
    with pytest.raises(RuntimeError, match="weight_hh_l0"):
        SpeakerEncoder.from_state_dict(state)
    state = source.state_dict()
    del state["lstm.weight_ih_l1"]
    with pytest.raises(RuntimeError, match='Missing key.*"lstm.weight_ih_l1"'):
        SpeakerEncoder.from_state_dict(state)
    with pytest.raises(ValueError, match="linear.weight takes 5 inputs but the LSTM has 12 units"):
        infer_model_config({**source.state_dict(), "linear.weight": torch.zeros(7, 5)})


def _unrolled_lstm_encoder(encoder: SpeakerEncoder, mels: torch.Tensor) -> torch.Tensor:
    """The encoder's forward written as explicit matrix products (PyTorch's LSTM equations)."""
    x = mels
    for layer in range(encoder.lstm.num_layers):
        w_ih, w_hh, b_ih, b_hh = (getattr(encoder.lstm, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        h = torch.zeros(mels.shape[0], encoder.lstm.hidden_size)
        c = torch.zeros_like(h)
        outputs = []
        for t in range(mels.shape[1]):
            i, f, g, o = (x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        x = torch.stack(outputs, dim=1)
    raw = torch.relu(h @ encoder.linear.weight.T + encoder.linear.bias)
    return raw / raw.norm(dim=1, keepdim=True)


def test_count_flops_matches_the_counted_matrix_products():
    config, n_mels, n_frames, batch = ModelConfig(hidden_size=6, n_layers=2, embedding_size=5), 3, 7, 4
    encoder = SpeakerEncoder(config, n_mels=n_mels)
    mels = torch.rand(batch, n_frames, n_mels)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unrolled = _unrolled_lstm_encoder(encoder, mels)
    with torch.no_grad():
        torch.testing.assert_close(unrolled, encoder(mels))
    bias_adds = batch * (n_frames * config.n_layers * 2 * 4 * config.hidden_size + config.embedding_size)
    assert count_flops(config, n_frames, batch, n_mels) - bias_adds == counter.get_total_flops()
    assert count_flops(config, 2 * n_frames, batch, n_mels) > count_flops(config, n_frames, batch, n_mels)
    assert count_flops(config, n_frames, 3 * batch, n_mels) == 3 * count_flops(config, n_frames, batch, n_mels)


def test_same_embeddings_as_resemblyzer_with_the_pretrained_weights(real_partials):
    state = torch.load(PRETRAINED, map_location="cpu", weights_only=True)["model_state"]
    encoder = SpeakerEncoder.from_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")})
    assert infer_model_config(encoder.state_dict()) == (ModelConfig(), 40)
    reference = resemblyzer.VoiceEncoder(device="cpu", verbose=False)
    with torch.no_grad():
        ours, theirs = encoder(real_partials), reference(real_partials)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # real speech through trained weights: distinct partials, all unit length
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(3))
    assert (ours[0] @ ours[1]).item() < 0.9999
