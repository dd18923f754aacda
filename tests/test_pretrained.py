"""The model shipped in the package: size, format, provenance, and that the Python API and the
CLI use it when no checkpoint is given."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from spkenc.checkpoint import load_checkpoint
from spkenc.inference import Embedder, pretrained_checkpoint

MODELS = Path(__file__).resolve().parents[1] / "spkenc" / "models"


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_the_packaged_checkpoint_is_small_and_loads_without_code():
    path = pretrained_checkpoint()
    assert path == MODELS / "encoder.pt"
    assert path.stat().st_size <= 20 * 2**20
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["optimizer_state"] is None
    assert state["model_config"] == {"hidden_size": 256, "n_layers": 3, "embedding_size": 256}
    assert {"similarity_weight", "similarity_bias", "lstm.weight_ih_l0", "linear.weight"} <= set(state["model_state"])


def test_the_model_card_matches_the_checkpoint():
    card = (MODELS / "MODEL_CARD.md").read_text()
    state = load_checkpoint(pretrained_checkpoint())
    steps = re.search(r"\*\*steps\*\*: ([\d,]+)", card)
    assert steps is not None, "the card does not state the training steps"
    assert int(steps.group(1).replace(",", "")) == int(state["step"])
    for word in ("speechocean762", "LibriSpeech", "CC BY 4.0", "EER"):
        assert word in card, word


def test_resemblyzer_loads_the_packaged_model_unchanged(demo_files):
    resemblyzer = pytest.importorskip("resemblyzer", reason="the reference package is installed by scripts/setup.sh --test")
    from spkenc.audio import preprocess_wav

    theirs = resemblyzer.VoiceEncoder(device="cpu", weights_fpath=pretrained_checkpoint(), verbose=False)
    ours = Embedder.from_pretrained(device="cpu")
    wav = preprocess_wav(demo_files[0])
    cosine = float(theirs.embed_utterance(wav, rate=1.3) @ ours.embed_utterance(wav, rate=1.3))
    assert cosine > 0.9999


def test_from_pretrained_separates_demo_speakers(demo_dir):
    from spkenc.audio import preprocess_wav

    embedder = Embedder.from_pretrained(device="cpu")
    speakers = sorted(p for p in demo_dir.iterdir() if p.is_dir())[:4]
    embeds = {s.name: embedder.embed_utterances([preprocess_wav(f) for f in sorted(s.glob("*.flac"))[:4]]) for s in speakers}
    same = np.mean([float(e[0] @ e[1]) for e in embeds.values()])
    names = list(embeds)
    different = np.mean([float(embeds[a][0] @ embeds[b][0]) for a in names for b in names if a < b])
    assert same > different + 0.1, (same, different)


def test_cli_embed_and_evaluate_use_the_packaged_model_by_default(demo_files, demo_dir, tmp_path):
    import json

    import pyarrow.parquet as pq

    from spkenc.audio import preprocess_wav
    from spkenc.cli import main

    out = tmp_path / "e.parquet"
    assert main(["embed", str(demo_files[0]), "--output", str(out), "--device", "cpu"]) == 0
    written = np.asarray(pq.read_table(out).column("embedding").to_pylist()[0], dtype=np.float32)
    expected = Embedder.from_pretrained(device="cpu").embed_utterance(preprocess_wav(demo_files[0]))
    np.testing.assert_allclose(written, expected, atol=1e-5)

    small = tmp_path / "corpus"
    for speaker in sorted(p for p in demo_dir.iterdir() if p.is_dir())[:3]:
        (small / speaker.name).mkdir(parents=True)
        for f in sorted(speaker.glob("*.flac"))[:3]:
            (small / speaker.name / f.name).symlink_to(f)
    report = tmp_path / "r.json"
    assert main(["evaluate", str(small), "--layout", "speaker_folders", "--output", str(report), "--device", "cpu"]) == 0
    assert 0.0 <= json.loads(report.read_text())["eer"] < 0.5


def _recipe_train_config(name: str) -> dict:
    """A recipe's encoder_model settings, after Dagster has validated the whole file as run config."""
    import dagster as dg
    import yaml

    from pipelines.assets.training import EncoderModelConfig
    from pipelines.definitions import defs

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / name).read_text())
    dg.validate_run_config(defs.resolve_implicit_global_asset_job_def(), recipe)
    config = EncoderModelConfig(**recipe["ops"]["encoder_model"]["config"])
    return config.spkenc_train_config(config.speakers_per_batch, config.utterances_per_speaker).to_dict()


def test_the_finetune_recipe_is_the_packaged_models_training():
    """recipes/finetune.yaml (the README's fine-tuning recipe) trains with the shipped model's settings."""
    from spkenc.config import TrainConfig

    stored = torch.load(pretrained_checkpoint(), map_location="cpu", weights_only=True)["train_config"]
    # A setting added after the model was trained is absent from its stored config: it trained with the default.
    shipped = TrainConfig.from_dict(stored).to_dict()
    recipe = _recipe_train_config("finetune.yaml")
    differing = {k: (recipe[k], shipped[k]) for k in recipe if recipe[k] != shipped[k]}
    assert differing == {}, differing


def test_the_scratch_recipe_is_valid_dagster_config():
    """Dagster accepts recipes/scratch.yaml, and it is the README's run scratch_T."""
    recipe = _recipe_train_config("scratch.yaml")
    assert (recipe["steps"], recipe["lr_warmup_steps"], recipe["lr_decay_steps"]) == (3000, 100, 2900)
    assert (recipe["crop_n_frames"], recipe["input_lr_scale"], recipe["lstm_dropout"]) == (120, 30.0, 0.3)
    assert recipe["corpus_weights"] == {"speechocean762_train": 6.0}
