"""GE2E training on real mel shards from the demo corpus: overfitting, exact resume, kill -9,
fine-tuning, gradient handling, the CLI and the UMAP/loss-curve outputs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from spkenc.config import AudioConfig, ModelConfig, TrainConfig
from spkenc.training import TrainProgress, train

PARTIAL = AudioConfig().partial_n_frames
TINY = ModelConfig(hidden_size=32, n_layers=1, embedding_size=32)
REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shards(demo_dir: Path, tmp_path_factory) -> list[Path]:
    """Shards of the first 6 demo speakers with at least 4 utterances of >= 160 frames."""
    from spkenc.audio import preprocess_wav, wav_to_mel
    from spkenc.shards import write_shard

    folder = tmp_path_factory.mktemp("train_shards")
    paths = []
    for speaker_dir in sorted(p for p in demo_dir.iterdir() if p.is_dir()):
        utterances = []
        for path in sorted(speaker_dir.glob("*.flac")):
            mel = wav_to_mel(preprocess_wav(path))
            if len(mel) >= PARTIAL:
                utterances.append((path.stem, mel, str(path)))
        if len(utterances) >= 4:
            paths.append(write_shard(folder / f"{speaker_dir.name}.parquet", speaker_dir.name, utterances, corpus="demo"))
        if len(paths) == 6:
            return paths
    raise AssertionError("the demo corpus has fewer than 6 speakers with 4 usable utterances")


def config(**changes) -> TrainConfig:
    base = dict(speakers_per_batch=4, utterances_per_speaker=4, steps=4, save_every=2, backup_every=4, learning_rate_init=1e-3)
    return TrainConfig(**{**base, **changes})


@pytest.mark.slow
def test_a_small_model_overfits_four_speakers(shards, tmp_path):
    losses: list[float] = []
    result = train(shards[:4], tmp_path / "run", config(steps=200, save_every=200, backup_every=200),
                   model_config=ModelConfig(hidden_size=64, n_layers=1, embedding_size=64), device="cpu",
                   callback=lambda p: losses.append(p.loss))
    assert len(losses) == 200 and result.step == 200
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.5 * first, f"loss fell only from {first:.3f} to {last:.3f}"
    assert (tmp_path / "run" / "encoder.pt").is_file()
    assert (tmp_path / "run" / "loss_curve.png").read_bytes().startswith(PNG)


def _state(path: Path) -> dict:
    from spkenc.checkpoint import load_checkpoint

    return load_checkpoint(path)


def _assert_identical(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_resuming_gives_bit_identical_weights_to_an_uninterrupted_run(shards, tmp_path):
    straight = train(shards, tmp_path / "straight", config(steps=6, save_every=3), model_config=TINY, device="cpu")
    train(shards, tmp_path / "split", config(steps=3, save_every=3), model_config=TINY, device="cpu")
    resumed = train(shards, tmp_path / "split", config(steps=6, save_every=3), model_config=TINY, device="cpu", resume=True)
    a, b = _state(straight.checkpoint_path), _state(resumed.checkpoint_path)
    assert a["step"] == b["step"] == 6
    _assert_identical(a["model_state"], b["model_state"], "model_state")
    _assert_identical(a["optimizer_state"], b["optimizer_state"], "optimizer_state")
    assert resumed.history_losses == straight.history_losses
    assert resumed.history_steps == list(range(1, 7))


def test_resuming_a_checkpoint_from_before_a_setting_existed_reports_no_change(shards, tmp_path, caplog):
    from spkenc.checkpoint import load_checkpoint

    cfg = config(steps=1, speaker_speeds=(0.9,), short_speaker_policy="repeat")
    train(shards, tmp_path, cfg, model_config=TINY, device="cpu")
    path = tmp_path / "encoder.pt"
    state = load_checkpoint(path)
    for newer in ("weight_decay", "lstm_dropout", "input_lr_scale"):
        del state["train_config"][newer]
    torch.save(state, path)
    with caplog.at_level("WARNING", logger="spkenc"):
        train(shards, tmp_path, cfg.replace(steps=2), model_config=TINY, device="cpu", resume=True)
    assert "changed training settings" not in caplog.text
    train(shards, tmp_path, cfg.replace(steps=3, lstm_dropout=0.1), model_config=TINY, device="cpu", resume=True)
    assert "'lstm_dropout': (0.0, 0.1)" in caplog.text
    assert "lstm_dropout 0.1 has no effect" in caplog.text  # TINY has one layer


def test_an_existing_run_is_not_overwritten_without_resume(shards, tmp_path):
    train(shards, tmp_path, config(steps=1), model_config=TINY, device="cpu")
    with pytest.raises(FileExistsError, match="encoder.pt exists"):
        train(shards, tmp_path, config(steps=2), model_config=TINY, device="cpu")


def test_checkpoints_and_numbered_backups_are_written_on_schedule(shards, tmp_path):
    saved: list[int] = []
    train(shards, tmp_path, config(steps=5, save_every=2, backup_every=4), model_config=TINY, device="cpu",
          callback=lambda p: saved.append(p.step) if p.checkpoint_path else None)
    assert saved == [2, 4, 5]
    assert sorted(p.name for p in (tmp_path / "backups").iterdir()) == ["encoder_000004.pt"]
    assert _state(tmp_path / "backups" / "encoder_000004.pt")["step"] == 4


def test_backups_keep_their_schedule_when_it_is_not_a_multiple_of_save_every(shards, tmp_path):
    train(shards, tmp_path, config(steps=6, save_every=4, backup_every=3), model_config=TINY, device="cpu", n_threads=1)
    assert sorted(p.name for p in (tmp_path / "backups").iterdir()) == ["encoder_000003.pt", "encoder_000006.pt"]
    assert _state(tmp_path / "backups" / "encoder_000003.pt")["step"] == 3


def test_wb_gradients_are_scaled_before_the_update(shards, tmp_path):
    seen: list[TrainProgress] = []
    train(shards, tmp_path / "frozen", config(steps=2, wb_grad_scale=0.0), model_config=TINY, device="cpu", callback=seen.append)
    assert [(p.w, p.b) for p in seen] == [(10.0, -5.0)] * 2, "a zero scale must leave w and b untouched"
    seen.clear()
    train(shards, tmp_path / "scaled", config(steps=2), model_config=TINY, device="cpu", callback=seen.append)
    assert seen[-1].w != 10.0 and seen[-1].b != -5.0


def test_fine_tuning_starts_from_the_given_weights(shards, tmp_path):
    import resemblyzer

    from spkenc.checkpoint import load_checkpoint, load_encoder, load_loss_state
    from spkenc.ge2e import GE2ELoss
    from spkenc.sampling import ShardStore, sample_batch

    pretrained = Path(resemblyzer.__file__).parent / "pretrained.pt"
    cfg = config(steps=1, speakers_per_batch=2, utterances_per_speaker=2, learning_rate_init=1e-4)
    reference = load_checkpoint(pretrained)
    encoder, _ = load_encoder(reference)
    loss_fn = GE2ELoss()
    load_loss_state(reference, loss_fn)
    batch = sample_batch(ShardStore(shards), cfg.seed, 0, speakers_per_batch=2, utterances_per_speaker=2)
    with torch.no_grad():
        expected, _ = loss_fn(encoder(torch.from_numpy(batch.mels).reshape(4, PARTIAL, 40)).reshape(2, 2, -1))

    seen: list[TrainProgress] = []
    result = train(shards, tmp_path, cfg, init_from=pretrained, device="cpu", callback=seen.append)
    assert seen[0].loss == pytest.approx(float(expected), rel=1e-5)
    tuned = _state(result.checkpoint_path)["model_state"]
    moved = max(float((tuned[k] - v).abs().max()) for k, v in reference["model_state"].items())
    assert 0 < moved <= 1.01e-4, "one Adam step at lr 1e-4 moves each weight by at most 1e-4"


def _autocast_lstm_runs() -> bool:
    """Whether a 3-layer LSTM of another shape than the probe's runs under bfloat16 autocast here."""
    lstm = torch.nn.LSTM(40, 24, num_layers=3, batch_first=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = lstm(torch.rand(4, 10, 40))
        out.float().sum().backward()
    except RuntimeError:
        return False
    return True


NO_BF16_LSTM = "this CPU has no bfloat16 LSTM kernel (oneDNN needs AVX-512 BF16 or AMX); the refusal is tested instead"


def test_the_bf16_probe_agrees_with_the_kernel_and_names_the_fix():
    from spkenc.precision import bf16_autocast_error, check_bf16_autocast

    assert (bf16_autocast_error("cpu") is None) == _autocast_lstm_runs()
    if bf16_autocast_error("cpu") is None:
        check_bf16_autocast(torch.device("cpu"))
    else:
        with pytest.raises(ValueError, match="bf16 autocast is not available on cpu .* bf16: false in the Dagster config"):
            check_bf16_autocast(torch.device("cpu"))


ONEDNN = "could not create a primitive descriptor for the LSTM forward propagation primitive"


def test_bf16_without_a_bfloat16_lstm_is_refused_before_the_shards_load(tmp_path, monkeypatch):
    import spkenc.precision

    monkeypatch.setattr(spkenc.precision, "bf16_autocast_error", lambda device: ONEDNN)
    missing = [tmp_path / "never_read.parquet"]  # train() would raise FileNotFoundError had it got that far
    with pytest.raises(ValueError, match=f"bf16 autocast is not available on cpu .*{ONEDNN}.*no --bf16"):
        train(missing, tmp_path / "run", config(steps=1, bf16=True), model_config=TINY, device="cpu")
    assert not (tmp_path / "run").exists()
    with pytest.raises(FileNotFoundError):  # without bf16 the same call does reach the shards
        train(missing, tmp_path / "run", config(steps=1), model_config=TINY, device="cpu")


def test_cli_train_bf16_without_a_bfloat16_lstm_exits_1_with_the_reason(shards, tmp_path, monkeypatch, caplog):
    import spkenc.precision
    from spkenc.cli import main

    monkeypatch.setattr(spkenc.precision, "bf16_autocast_error", lambda device: ONEDNN)
    assert main(["train", *_one_step_cli_args(shards), "--out", str(tmp_path / "run"), "--bf16"]) == 1
    assert "bf16 autocast is not available on cpu" in caplog.text and ONEDNN in caplog.text
    assert not (tmp_path / "run" / "encoder.pt").exists()


@pytest.mark.skipif(not _autocast_lstm_runs(), reason=NO_BF16_LSTM)
def test_bf16_autocast_trains_close_to_float32(shards, tmp_path):
    bf16, fp32 = [], []
    train(shards, tmp_path / "bf16", config(steps=2, bf16=True), model_config=TINY, device="cpu", callback=bf16.append)
    train(shards, tmp_path / "fp32", config(steps=2), model_config=TINY, device="cpu", callback=fp32.append)
    assert len(bf16) == 2 and all(np.isfinite(p.loss) for p in bf16)
    assert bf16[0].loss != fp32[0].loss, "autocast must change the arithmetic"
    assert bf16[0].loss == pytest.approx(fp32[0].loss, rel=0.05)


def test_probe_umaps_and_the_loss_curve_are_drawn(shards, tmp_path):
    seen: list[TrainProgress] = []
    cfg = config(steps=4, umap_every=2, n_probe_speakers=2, n_probe_utterances=4)
    result = train(shards[:4], tmp_path, cfg, model_config=TINY, device="cpu", probe_paths=shards[4:], callback=seen.append)
    drawn = [p.umap_path for p in seen if p.umap_path]
    assert [p.name for p in drawn] == ["umap_000002.png", "umap_000004.png"]
    assert all(p.read_bytes().startswith(PNG) for p in drawn)
    assert result.umap_path == drawn[-1] and result.loss_curve_path.read_bytes().startswith(PNG)


def _one_step_cli_args(shards: list[Path], n_layers: int = 1) -> list[str]:
    """`spkenc train` arguments for one step of a small model on the demo shards (without --out)."""
    return [str(shards[0].parent), "--steps", "1", "--speakers-per-batch", "3", "--utterances-per-speaker", "2",
            "--short-speaker-policy", "repeat", "--hidden-size", "16", "--n-layers", str(n_layers), "--embedding-size", "16",
            "--threads", "1"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "spkenc", "train", *args]


def test_cli_writes_encoder_pt_and_reports_bad_input(shards, tmp_path, caplog):
    from spkenc.cli import main

    run = tmp_path / "run"
    assert main(["train", str(shards[0].parent), "--out", str(run), "--steps", "2", "--save-every", "1",
                 "--speakers-per-batch", "3", "--utterances-per-speaker", "3", "--hidden-size", "32",
                 "--n-layers", "1", "--embedding-size", "32", "--device", "cpu", "--threads", "1"]) == 0
    assert _state(run / "encoder.pt")["step"] == 2
    assert main(["train", str(tmp_path / "missing"), "--out", str(run)]) == 1
    assert "missing: no such shard file or folder" in caplog.text
    assert main(["train", str(shards[0].parent), "--out", str(tmp_path / "big"), "--speakers-per-batch", "40"]) == 1
    assert "a batch needs 40 speakers" in caplog.text


def test_cli_passes_speaker_speeds_and_single_corpus_batches_to_training(shards, tmp_path, capsys):
    from spkenc.cli import main

    run = tmp_path / "run"
    assert main(["train", str(shards[0].parent), "--out", str(run), "--steps", "1", "--speakers-per-batch", "3",
                 "--utterances-per-speaker", "2", "--short-speaker-policy", "repeat", "--hidden-size", "16", "--n-layers", "1",
                 "--embedding-size", "16", "--threads", "1", "--speaker-speeds", "0.9,1.1", "--single-corpus-batches"]) == 0
    stored = _state(run / "encoder.pt")["train_config"]
    assert tuple(stored["speaker_speeds"]) == (0.9, 1.1) and stored["single_corpus_batches"] is True
    with pytest.raises(SystemExit):
        main(["train", str(shards[0].parent), "--out", str(tmp_path / "bad"), "--speaker-speeds", "fast"])
    assert "--speaker-speeds" in capsys.readouterr().err


def test_cli_passes_corpus_weights_and_refuses_a_corpus_it_does_not_train_on(shards, tmp_path, capsys, caplog):
    from spkenc.cli import main
    from spkenc.sampling import ShardStore, find_shards

    name = ShardStore(find_shards([shards[0].parent])).speakers[0].corpus
    common = _one_step_cli_args(shards)
    assert main(["train", *common, "--out", str(tmp_path / "run"), "--corpus-weights", f"{name}=2.5"]) == 0
    assert _state(tmp_path / "run" / "encoder.pt")["train_config"]["corpus_weights"] == {name: 2.5}
    assert main(["train", *common, "--out", str(tmp_path / "typo"), "--corpus-weights", "no_such_corpus=2"]) == 1
    assert "corpus_weights name ['no_such_corpus']" in caplog.text
    with pytest.raises(SystemExit):
        main(["train", *common, "--out", str(tmp_path / "bad"), "--corpus-weights", "speechocean"])
    assert "--corpus-weights" in capsys.readouterr().err


def test_cli_passes_the_masking_settings_and_refuses_a_band_wider_than_the_mels(shards, tmp_path, caplog):
    from spkenc.cli import main

    common = _one_step_cli_args(shards)
    assert main(["train", *common, "--out", str(tmp_path / "run"), "--aug-freq-mask", "8", "--aug-time-mask", "20"]) == 0
    stored = _state(tmp_path / "run" / "encoder.pt")["train_config"]
    assert (stored["aug_freq_mask"], stored["aug_time_mask"]) == (8, 20)
    assert main(["train", *common, "--out", str(tmp_path / "wide"), "--aug-freq-mask", "40"]) == 1
    assert "aug_freq_mask must be in [0, 40)" in caplog.text


def test_weight_decay_shrinks_the_weight_matrices_after_the_adam_step_and_nothing_else(shards, tmp_path):
    plain = _state(train(shards, tmp_path / "plain", config(steps=1), model_config=TINY, device="cpu").checkpoint_path)
    decayed = _state(train(shards, tmp_path / "decayed", config(steps=1, weight_decay=0.5), model_config=TINY,
                           device="cpu").checkpoint_path)
    factor = 1.0 - 1e-3 * 0.5  # lr of the first step (no warmup) x weight_decay
    for key, value in plain["model_state"].items():
        if value.dim() >= 2:
            torch.testing.assert_close(decayed["model_state"][key], value * factor, rtol=1e-6, atol=0)
            assert not torch.equal(decayed["model_state"][key], value), key
        else:  # biases, and the loss's similarity_weight and similarity_bias
            assert torch.equal(decayed["model_state"][key], value), key
    _assert_identical(plain["optimizer_state"], decayed["optimizer_state"], "optimizer_state")


def test_lstm_dropout_acts_in_training_only_and_leaves_the_checkpoint_format_alone(shards, tmp_path):
    from spkenc.checkpoint import load_encoder

    two_layers = ModelConfig(hidden_size=32, n_layers=2, embedding_size=32)
    plain, dropped = [], []
    train(shards, tmp_path / "plain", config(steps=1), model_config=two_layers, device="cpu", callback=plain.append)
    result = train(shards, tmp_path / "dropout", config(steps=1, lstm_dropout=0.5), model_config=two_layers,
                   device="cpu", callback=dropped.append)
    assert dropped[0].loss != plain[0].loss, "the same first batch through the same weights: only dropout differs"
    state = _state(result.checkpoint_path)
    assert state["model_state"].keys() == _state(tmp_path / "plain" / "encoder.pt")["model_state"].keys()
    encoder, _ = load_encoder(state)
    assert encoder.lstm.dropout == 0.0, "a loaded model embeds without dropout"


def test_input_lr_scale_multiplies_the_step_of_the_first_input_weights_and_nothing_else(shards, tmp_path):
    two_layers = ModelConfig(hidden_size=32, n_layers=2, embedding_size=32)
    initial = _state(train(shards, tmp_path / "initial", config(steps=0), model_config=two_layers,
                           device="cpu").checkpoint_path)["model_state"]  # the seed's weights, before any step
    plain = _state(train(shards, tmp_path / "plain", config(steps=1), model_config=two_layers, device="cpu").checkpoint_path)
    scaled = _state(train(shards, tmp_path / "scaled", config(steps=1, input_lr_scale=8.0), model_config=two_layers,
                          device="cpu").checkpoint_path)
    key = "lstm.weight_ih_l0"
    plain_step = plain["model_state"][key] - initial[key]
    assert plain_step.abs().max() > 0
    torch.testing.assert_close(scaled["model_state"][key] - initial[key], 8.0 * plain_step, rtol=1e-4, atol=1e-7)
    for name, value in plain["model_state"].items():
        if name != key:
            assert torch.equal(scaled["model_state"][name], value), name
    _assert_identical(plain["optimizer_state"], scaled["optimizer_state"], "optimizer_state")  # RTVC's Adam state


@pytest.mark.parametrize("changes, message", [
    ({"weight_decay": -0.1}, "weight_decay must be non-negative"),
    ({"weight_decay": 1e4, "learning_rate_init": 1e-4}, "got 10000.0 at learning rate 0.0001"),
    ({"lstm_dropout": 1.0}, "lstm_dropout must be in"),
    ({"input_lr_scale": 0.0}, "input_lr_scale must be positive and finite, got 0.0"),
    ({"input_lr_scale": float("inf")}, "input_lr_scale must be positive and finite"),
])
def test_out_of_range_regularization_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_cli_passes_weight_decay_and_lstm_dropout_and_refuses_a_bad_one(shards, tmp_path, caplog):
    from spkenc.cli import main

    common = _one_step_cli_args(shards, n_layers=2)
    assert main(["train", *common, "--out", str(tmp_path / "run"), "--weight-decay", "0.05", "--lstm-dropout", "0.2"]) == 0
    stored = _state(tmp_path / "run" / "encoder.pt")["train_config"]
    assert (stored["weight_decay"], stored["lstm_dropout"]) == (0.05, 0.2)
    assert main(["train", *common, "--out", str(tmp_path / "bad"), "--lstm-dropout", "1.5"]) == 1
    assert "lstm_dropout must be in [0, 1), got 1.5" in caplog.text
    assert main(["train", *common, "--out", str(tmp_path / "scaled"), "--input-lr-scale", "30"]) == 0
    assert _state(tmp_path / "scaled" / "encoder.pt")["train_config"]["input_lr_scale"] == 30.0
    assert main(["train", *common, "--out", str(tmp_path / "bad_scale"), "--input-lr-scale", "-1"]) == 1
    assert "input_lr_scale must be positive and finite, got -1.0" in caplog.text


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_leaves_a_loadable_checkpoint(shards, tmp_path):
    """A 3x256 model makes each checkpoint write take long enough to catch a temp file."""
    run = tmp_path / "run"
    args = [str(shards[0].parent), "--out", str(run), "--speakers-per-batch", "2", "--utterances-per-speaker", "2",
            "--save-every", "1", "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "") + os.pathsep + str(REPO)}
    proc = subprocess.Popen(_cli(*args, "--steps", "500"), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    caught = None
    deadline = time.monotonic() + 120
    try:
        while caught is None and time.monotonic() < deadline and proc.poll() is None:
            if (run / "encoder.pt").exists():
                temp = [p.name for p in run.iterdir() if p.name not in ("encoder.pt", "backups")]
                if temp:
                    os.kill(proc.pid, signal.SIGKILL)
                    caught = temp
            time.sleep(0.0005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert caught, f"never saw a checkpoint write in progress: {proc.stderr.read().decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    killed_at = _state(run / "encoder.pt")["step"]
    assert killed_at >= 1
    # --resume alone takes the batch geometry and save schedule from the checkpoint.
    again = [str(shards[0].parent), "--out", str(run), "--steps", str(killed_at + 2), "--resume", "--threads", "1"]
    resumed = subprocess.run(_cli(*again), cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = _state(run / "encoder.pt")
    assert final["step"] == killed_at + 2
    assert final["train_config"]["speakers_per_batch"] == 2 and final["train_config"]["save_every"] == 1


def test_subnormals_are_flushed_while_training_and_restored_after(shards, tmp_path):
    """Near-zero fine-tuning losses make subnormal gradients, which are slow on x86 CPUs."""
    seen: list[float] = []
    train(shards, tmp_path / "run", config(steps=2), model_config=TINY, device="cpu",
          callback=lambda p: seen.append(float(torch.tensor(1e-42) * 1.0)))
    assert seen == [0.0, 0.0]
    assert float(torch.tensor(1e-42)) > 0.0
