"""The bf16 fast mode: agreement with fp32 on real speech, refusals by name, the CLI flag."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import resemblyzer
import torch

from spkenc.audio import preprocess_wav
from spkenc.cli import main
from spkenc.config import ModelConfig
from spkenc.inference import Embedder
from spkenc.model import SpeakerEncoder
from spkenc.precision import Bf16Encoder, encoder_for

PRETRAINED = Path(resemblyzer.__file__).parent / "pretrained.pt"
FLOOR = 0.999  # issue 6: cosine to fp32 on every utterance

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bf16_refusal() -> str:
    """'' where the fast mode's kernel runs on this CPU, else Bf16Encoder's refusal."""
    try:
        Bf16Encoder(SpeakerEncoder(ModelConfig(hidden_size=8, n_layers=2, embedding_size=4), n_mels=5))
    except ValueError as error:
        return str(error)
    return ""


NEEDS_BF16 = pytest.mark.skipif(bool(_bf16_refusal()), reason="this CPU has no bfloat16 LSTM kernel (oneDNN needs "
                                "AVX-512 BF16 or AMX); test_bf16_is_refused_by_name_where_the_cpu_lacks_it runs instead")


@pytest.fixture(scope="module")
def embedders() -> tuple[Embedder, Embedder]:
    return (Embedder.from_checkpoint(PRETRAINED, device="cpu"),
            Embedder.from_checkpoint(PRETRAINED, device="cpu", precision="bf16"))


@pytest.fixture(scope="module")
def demo_wavs(demo_files) -> list[np.ndarray]:
    """Two utterances of each of the 24 demo speakers, the shortest ones among them (1 partial)."""
    by_length = sorted(demo_files, key=lambda path: path.stat().st_size)
    picked = sorted(set(by_length[:12]) | set(demo_files[::4]))
    return [preprocess_wav(path) for path in picked]


@NEEDS_BF16
def test_bf16_stays_within_1e_3_cosine_of_fp32_on_every_demo_utterance(embedders, demo_wavs) -> None:
    fp32, bf16 = embedders
    e32 = fp32.embed_utterances(demo_wavs, rate=1.3)
    e16 = bf16.embed_utterances(demo_wavs, rate=1.3)
    assert e16.dtype == np.float32 and e16.shape == e32.shape
    cosines = np.sum(e32 * e16, axis=1)
    assert cosines.min() >= FLOOR, f"min cosine {cosines.min():.6f} on utterance {cosines.argmin()}"
    assert np.abs(e32 - e16).max() > 1e-6, "bf16 gave fp32's embeddings: the fast mode did not run"
    np.testing.assert_allclose(np.linalg.norm(e16, axis=1), 1.0, rtol=1e-5)
    assert (e16 >= 0).all()


@NEEDS_BF16
def test_bf16_partials_stay_within_1e_3_cosine_of_fp32(embedders, demo_wavs) -> None:
    fp32, bf16 = embedders
    longest = max(demo_wavs, key=len)
    _, p32, slices32 = fp32.embed_utterance(longest, return_partials=True)
    _, p16, slices16 = bf16.embed_utterance(longest, return_partials=True)
    assert slices16 == slices32 and len(p16) >= 3
    cosines = np.sum(p32 * p16, axis=1) / np.linalg.norm(p16, axis=1)
    assert cosines.min() >= FLOOR


@NEEDS_BF16
def test_encoder_for_bf16_runs_a_small_model() -> None:  # was a doctest of encoder_for
    model = SpeakerEncoder(ModelConfig(hidden_size=8, n_layers=2, embedding_size=4), n_mels=5)
    assert tuple(encoder_for(model, "bf16")(torch.rand(3, 20, 5)).shape) == (3, 4)


@NEEDS_BF16
def test_bf16_runs_the_lstm_in_bfloat16_and_the_head_in_float32(embedders) -> None:
    fp32, bf16 = embedders
    encoder = bf16._encoder
    assert isinstance(encoder, Bf16Encoder) and fp32._encoder is fp32.model
    assert {p.dtype for p in encoder.lstm.parameters()} == {torch.bfloat16}
    assert encoder.linear is bf16.model.linear and encoder.linear.weight.dtype == torch.float32
    assert {p.dtype for p in bf16.model.parameters()} == {torch.float32}  # the model itself is untouched
    frames = torch.rand(2, 30, 40)
    assert bf16.embed_frames_batch(frames).shape == (2, 256)


@pytest.mark.parametrize("bad", ["fp16", "BF16", "", "float32"])
def test_bad_precision_is_refused_by_name(bad, tmp_path) -> None:
    message = f"precision {bad!r}: expected one of 'fp32', 'bf16'"
    with pytest.raises(ValueError, match=message):
        Embedder.from_checkpoint(tmp_path / "never_read.pt", device="cpu", precision=bad)
    with pytest.raises(ValueError, match=message):
        Embedder.from_pretrained(device="cpu", precision=bad)
    with pytest.raises(ValueError, match=message):
        Embedder(SpeakerEncoder(ModelConfig(hidden_size=8, n_layers=1, embedding_size=4)), device="cpu", precision=bad)


def test_bf16_is_refused_by_name_where_the_cpu_lacks_it(demo_files, tmp_path, caplog) -> None:
    refusal = _bf16_refusal()
    if not refusal:
        pytest.skip("this CPU runs the bfloat16 LSTM: the NEEDS_BF16 tests check the fast mode instead")
    assert refusal.startswith("precision 'bf16' is not available on this CPU or PyTorch build") and refusal.endswith("use 'fp32'")
    with pytest.raises(ValueError, match="precision 'bf16' is not available on this CPU"):
        Embedder.from_checkpoint(PRETRAINED, device="cpu", precision="bf16")
    out = tmp_path / "bf16.parquet"
    assert main(["embed", str(demo_files[0]), "--checkpoint", str(PRETRAINED), "--output", str(out), "--precision", "bf16"]) == 1
    assert "precision 'bf16' is not available on this CPU" in caplog.text and not out.exists()


def test_bf16_is_refused_off_the_cpu_and_for_other_models() -> None:
    on_meta = SpeakerEncoder(ModelConfig(hidden_size=8, n_layers=1, embedding_size=4), device="meta")
    with pytest.raises(ValueError, match="runs on the CPU only .* not on meta"):
        Bf16Encoder(on_meta)
    with pytest.raises(ValueError, match="needs a spkenc SpeakerEncoder, got Linear"):
        encoder_for(torch.nn.Linear(40, 4), "bf16")


@NEEDS_BF16
def test_cli_precision_flag_on_embed_verify_and_evaluate(demo_files, tmp_path, capsys) -> None:
    import pyarrow.parquet as pq

    files = [str(path) for path in (demo_files[0], demo_files[1], demo_files[8])]
    tables = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.parquet"
        assert main(["embed", *files, "--checkpoint", str(PRETRAINED), "--output", str(out), "--precision", precision]) == 0
        tables[precision] = np.stack(pq.read_table(out).column("embedding").to_pylist())
    cosines = np.sum(tables["fp32"] * tables["bf16"], axis=1)
    assert cosines.min() >= FLOOR and np.abs(tables["fp32"] - tables["bf16"]).max() > 1e-6

    scores = []
    for precision in ("fp32", "bf16"):
        assert main(["verify", files[0], files[1], "--checkpoint", str(PRETRAINED), "--precision", precision]) == 0
        scores.append(float(capsys.readouterr().out))
    assert abs(scores[0] - scores[1]) <= 2e-3

    corpus = tmp_path / "corpus"
    for path in demo_files[0:2] + demo_files[8:10] + demo_files[16:18]:
        (corpus / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, corpus / path.parent.name / path.name)
    thresholds = []
    for precision in ("fp32", "bf16"):
        report = tmp_path / f"report_{precision}.json"
        assert main(["evaluate", str(corpus), "--layout", "speaker_folders", "--checkpoint", str(PRETRAINED),
                     "--output", str(report), "--precision", precision]) == 0
        thresholds.append(json.loads(report.read_text())["eer_threshold"])
    assert 0 < abs(thresholds[0] - thresholds[1]) <= 2e-3  # bf16 scores: close to fp32's, not equal

    with pytest.raises(SystemExit) as exit_info:
        main(["verify", files[0], files[1], "--precision", "fp16"])
    assert exit_info.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err

