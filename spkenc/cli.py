"""The `spkenc` command line: preprocess, train, embed, verify, evaluate.

Exit codes: 0 on success, 2 on a usage error (argparse), 1 when nothing usable came out
or a checkpoint was refused.
"""

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

log = logging.getLogger("spkenc")

# Each command registers (name, add_arguments, run). run(args) returns the exit code.
_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = []


def command(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Decorator: register `run(args) -> int` as the subcommand `name`."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        _COMMANDS.append((name, help_text, add_arguments, run))
        return run

    return register


# ---- section: preprocess (corpus -> trimmed wavs -> mel shards) ----


def _preprocess_arguments(p: argparse.ArgumentParser) -> None:
    from pathlib import Path

    p.add_argument("corpus_root", type=Path, metavar="CORPUS_ROOT", help="corpus folder (or CSV/TSV file for --layout manifest)")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="manifest.parquet, rejects.parquet, trimmed/, mels/")
    p.add_argument("--layout", default="auto", choices=("auto", "librispeech", "voxceleb1", "voxceleb2", "speaker_folders", "manifest"),
                   help="corpus layout (default: detected)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="worker processes (default: all cores)")
    p.add_argument("--corpus", default="", help="corpus name in the manifest and shards (default: the root's name)")


@command("preprocess", "scan a corpus, trim its audio and write one mel shard per speaker", _preprocess_arguments)
def _preprocess(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from spkenc.preprocess import preprocess_corpus

    bars: dict = {}

    def show(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="file" if stage != "mel" else "speaker")
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    try:
        result = preprocess_corpus(args.corpus_root, args.out_dir, layout=args.layout, workers=args.workers,
                                   corpus=args.corpus, progress=show)
    except (ValueError, FileNotFoundError) as error:
        log.error("%s", error)
        return 1
    finally:
        for bar in bars.values():
            bar.close()
    trim, shards = result.trim, result.shards
    log.info("%d files kept (%.2f h -> %.2f h of speech), %d skipped as unchanged; %d rejects in %s",
             trim.n_kept, trim.hours_before, trim.hours_after, trim.n_skipped, result.n_rejects, result.rejects_path)
    log.info("%d speaker shards, %d utterances, %d frames in %s", shards.n_speakers, shards.n_utterances,
             shards.n_frames, shards.out_dir)
    if shards.n_speakers == 0:
        log.error("nothing usable came out of %s: see %s", args.corpus_root, result.rejects_path)
        return 1
    return 0


# ---- section: train ----


_TRAIN_FIELDS = ("steps", "save_every", "backup_every", "speakers_per_batch", "utterances_per_speaker",
                 "short_speaker_policy", "learning_rate_init", "lr_schedule", "lr_warmup_steps", "lr_decay_steps",
                 "lr_decay_gamma", "seed", "bf16", "crop_n_frames", "aug_volume_db", "aug_speed", "aug_noise_prob",
                 "aug_noise_snr_db_min", "aug_noise_snr_db_max", "aug_freq_mask", "aug_time_mask", "speaker_speeds",
                 "single_corpus_batches", "corpus_weights", "weight_decay", "lstm_dropout", "input_lr_scale")
_MODEL_FIELDS = ("hidden_size", "n_layers", "embedding_size")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    from pathlib import Path

    from spkenc.config import ModelConfig, TrainConfig

    t, mc = TrainConfig(), ModelConfig()
    p.add_argument("shard_dirs", nargs="+", metavar="SHARD_DIR", help="mel shard folders (searched recursively) or .parquet files")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder: encoder.pt, backups/, umap/, loss_curve.png")
    p.add_argument("--init-from", type=Path, metavar="CKPT", help="fine-tune from an RTVC-format checkpoint")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR/encoder.pt exactly, with its settings unless given here")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores, split between local ranks)")
    p.add_argument("--probe", nargs="+", default=[], type=Path, metavar="SHARD_DIR", help="held-out shards for the UMAP plots")
    p.add_argument("--split-manifest", nargs="+", default=[], type=Path, metavar="MANIFEST",
                   help="corpus manifests (work/corpora/<corpus>/manifest.parquet): drop the shards of their held-out speakers")
    # Training and model settings default to None so that --resume can tell what was given.
    p.add_argument("--steps", type=int, help=f"total optimizer steps (default {t.steps})")
    p.add_argument("--save-every", type=int, metavar="K", help=f"write RUN_DIR/encoder.pt every K steps (default {t.save_every})")
    p.add_argument("--backup-every", type=int, metavar="K", help=f"numbered backup every K steps (default {t.backup_every})")
    p.add_argument("--speakers-per-batch", type=int, metavar="N", help=f"per rank (default {t.speakers_per_batch})")
    p.add_argument("--utterances-per-speaker", type=int, metavar="M", help=f"(default {t.utterances_per_speaker})")
    p.add_argument("--short-speaker-policy", choices=("exclude", "repeat"),
                   help=f"speakers with fewer than M usable utterances: skip, or repeat utterances (default {t.short_speaker_policy})")
    p.add_argument("--learning-rate-init", type=float, help=f"Adam learning rate (default {t.learning_rate_init})")
    p.add_argument("--lr-schedule", choices=("constant", "cosine", "step"), help=f"(default {t.lr_schedule})")
    p.add_argument("--lr-warmup-steps", type=int, metavar="K", help=f"linear warmup (default {t.lr_warmup_steps})")
    p.add_argument("--lr-decay-steps", type=int, metavar="K",
                   help=f"cosine: steps after warmup to reach 0; step: steps per decay (default {t.lr_decay_steps})")
    p.add_argument("--lr-decay-gamma", type=float, help=f"step schedule factor (default {t.lr_decay_gamma})")
    p.add_argument("--seed", type=int, help=f"(default {t.seed})")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help=f"bfloat16 autocast for the encoder (default {t.bf16})")
    p.add_argument("--crop-n-frames", type=int, metavar="T", help="training crop in mel frames (default: 160, the inference partial)")
    p.add_argument("--aug-volume-db", type=float, metavar="DB", help=f"gain augmentation, +-DB (default {t.aug_volume_db})")
    p.add_argument("--aug-speed", type=float, metavar="X", help=f"speed augmentation, factor in [1-X, 1+X] (default {t.aug_speed})")
    p.add_argument("--aug-noise-prob", type=float, metavar="P",
                   help=f"share of crops mixed with another training speaker's recording (default {t.aug_noise_prob})")
    p.add_argument("--aug-noise-snr-db-min", type=float, metavar="DB", help=f"(default {t.aug_noise_snr_db_min})")
    p.add_argument("--aug-noise-snr-db-max", type=float, metavar="DB", help=f"(default {t.aug_noise_snr_db_max})")
    p.add_argument("--aug-freq-mask", type=int, metavar="F",
                   help=f"SpecAugment: zero one band of up to F mel channels per crop (default {t.aug_freq_mask})")
    p.add_argument("--aug-time-mask", type=int, metavar="T",
                   help=f"SpecAugment: zero one span of up to T frames per crop (default {t.aug_time_mask})")
    p.add_argument("--speaker-speeds", type=_speed_list, metavar="F,F",
                   help="speaker augmentation: each training speaker also counts as new speakers played at these "
                        "speed factors, e.g. 0.9,1.1 (default: none)")
    p.add_argument("--single-corpus-batches", action=argparse.BooleanOptionalAction,
                   help="draw each batch's speakers from one corpus, filled up from the others when it has too few "
                        f"(default {t.single_corpus_batches})")
    p.add_argument("--corpus-weights", type=_corpus_weights, metavar="CORPUS=W,...",
                   help="weigh the speakers of these corpora in the draw, e.g. speechocean762_train=3 (others weigh 1; "
                        "with --single-corpus-batches: how often each corpus's batches come)")
    p.add_argument("--weight-decay", type=float, metavar="WD",
                   help=f"decoupled weight decay of the encoder's weight matrices, AdamW style (default {t.weight_decay})")
    p.add_argument("--lstm-dropout", type=float, metavar="P",
                   help=f"dropout between the LSTM layers while training (default {t.lstm_dropout})")
    p.add_argument("--input-lr-scale", type=float, metavar="X",
                   help=f"Adam's step on the first LSTM layer's input weights times X (default {t.input_lr_scale})")
    p.add_argument("--hidden-size", type=int, help=f"LSTM width of a fresh model (default {mc.hidden_size})")
    p.add_argument("--n-layers", type=int, help=f"LSTM layers of a fresh model (default {mc.n_layers})")
    p.add_argument("--embedding-size", type=int, help=f"embedding size of a fresh model (default {mc.embedding_size})")
    p.add_argument("--rank-state-dir", type=Path, help=argparse.SUPPRESS)


def _speed_list(text: str) -> tuple[float, ...]:
    """ "0.9,1.1" -> (0.9, 1.1); argparse reports a ValueError as a usage error."""
    return tuple(float(part) for part in text.split(",") if part.strip())


def _corpus_weights(text: str) -> dict[str, float]:
    """ "a=3,b=0.5" -> {"a": 3.0, "b": 0.5}; argparse reports a ValueError as a usage error."""
    weights = {}
    for part in filter(str.strip, text.split(",")):
        name, sep, weight = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected CORPUS=WEIGHT, got {part!r}")
        weights[name.strip()] = float(weight)
    return weights


@command("train", "GE2E training over mel shards (resumable; distributed under torchrun)", _train_arguments)
def _train(args: argparse.Namespace) -> int:
    import os

    from tqdm import tqdm

    from spkenc.config import ModelConfig, TrainConfig
    from spkenc.sampling import drop_heldout, find_shards
    from spkenc.training import stored_train_config, train

    is_rank0 = os.environ.get("RANK", "0") == "0"
    given = {k: getattr(args, k) for k in _TRAIN_FIELDS if getattr(args, k) is not None}
    given_model = {k: getattr(args, k) for k in _MODEL_FIELDS if getattr(args, k) is not None}
    try:
        base = (stored_train_config(args.out) if args.resume else None) or TrainConfig()
        config = base.replace(**given)
        # Without model flags, --init-from/--resume take the checkpoint's model shape.
        model_config = ModelConfig.from_dict(given_model) if given_model or not (args.init_from or args.resume) else None
        shards = find_shards(args.shard_dirs)
        if args.split_manifest:
            shards, dropped = drop_heldout(shards, args.split_manifest)
            log.info("%d shards of held-out speakers left out, %d to train on", dropped, len(shards))
        probes = find_shards(args.probe) if args.probe else []
    except (ValueError, FileNotFoundError) as error:
        log.error("%s", error)
        return 1
    bar = tqdm(total=config.steps, unit="step", disable=not is_rank0)

    def show(progress) -> None:
        bar.n = progress.step
        bar.set_postfix(loss=f"{progress.loss:.3f}", eer=f"{progress.eer:.3f}", refresh=False)
        bar.refresh()

    try:
        result = train(shards, args.out, config, model_config=model_config, init_from=args.init_from, resume=args.resume,
                       device=args.device, n_threads=args.threads, callback=show, probe_paths=probes,
                       rank_state_dir=args.rank_state_dir)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        log.error("%s", error)
        return 1
    finally:
        bar.close()
    if is_rank0:
        log.info("step %d, final loss %s: %s", result.step, result.final_loss, result.checkpoint_path)
    return 0

# ---- section: embed / verify ----


def _embedder_arguments(p: argparse.ArgumentParser) -> None:
    from pathlib import Path

    p.add_argument("--checkpoint", type=Path, metavar="CKPT",
                   help="RTVC-format encoder checkpoint (RTVC's encoder.pt, Resemblyzer's pretrained.pt, spkenc's); "
                        "default: the model shipped with spkenc (spkenc/models/MODEL_CARD.md)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="partials per forward pass (default %(default)s)")
    p.add_argument("--rate", type=float, default=None, metavar="R",
                   help="partials per second, Resemblyzer's rule (default: RTVC's 50%% overlap)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: CPU fast mode, LSTM in bfloat16 with a float32 cell state, about 2x faster "
                        "with AVX-512 BF16 or AMX, cosine to fp32 >= 0.999 (default %(default)s)")


def _embed_arguments(p: argparse.ArgumentParser) -> None:
    from pathlib import Path

    p.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR",
                   help="audio files, or folders searched recursively for .wav .flac .ogg .opus .mp3 .m4a .aac")
    p.add_argument("--output", required=True, type=Path, metavar="OUT.parquet",
                   help="Parquet: path, embedding, n_partials, duration_s, error")
    _embedder_arguments(p)


def _load_embedder(args: argparse.Namespace):
    """The Embedder for --checkpoint/--device/--batch-size/--precision, or None after logging why not."""
    from spkenc.inference import Embedder

    try:
        if args.checkpoint is None:
            return Embedder.from_pretrained(device=args.device, batch_size=args.batch_size, precision=args.precision)
        return Embedder.from_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch_size,
                                        precision=args.precision)
    except (ValueError, OSError) as error:  # CheckpointError names the file; bad --device/--batch-size/--precision
        log.error("%s", error)
        return None


@command("embed", "embed audio files into a Parquet table of speaker embeddings", _embed_arguments)
def _embed(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from spkenc.file_inference import embed_files, find_audio_files, write_embeddings

    embedder = _load_embedder(args)
    if embedder is None:
        return 1
    paths = find_audio_files(args.inputs)
    if not paths:
        log.error("no audio files in %s", " ".join(args.inputs))
        return 1
    try:
        rows = list(embed_files(embedder, tqdm(paths, unit="file"), rate=args.rate))
    except ValueError as error:
        log.error("%s", error)
        return 1
    failed = [row for row in rows if row.error is not None]
    for row in failed:
        log.warning("%s", row.error)
    if len(failed) == len(rows):
        log.error("none of the %d file(s) could be embedded; %s not written", len(rows), args.output)
        return 1
    write_embeddings(rows, args.output)
    log.info("%s: %d embedded, %d failed", args.output, len(rows) - len(failed), len(failed))
    return 0


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="first audio file")
    p.add_argument("b", metavar="B", help="second audio file")
    _embedder_arguments(p)


@command("verify", "print the cosine similarity of two audio files' speaker embeddings", _verify_arguments)
def _verify(args: argparse.Namespace) -> int:
    from spkenc.file_inference import verify_files

    embedder = _load_embedder(args)
    if embedder is None:
        return 1
    try:
        score = verify_files(embedder, args.a, args.b, rate=args.rate)
    except ValueError as error:
        log.error("%s", error)
        return 1
    print(f"{score:.4f}")
    return 0


# ---- section: evaluate ----


def _trials_count(text: str) -> int:
    """--trials: "all" -> 0 (every cross pair), else a positive count."""
    if text == "all":
        return 0
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'all' or a positive number of trials, got {text!r}")
    return value


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    from pathlib import Path

    from spkenc.config import EvalConfig

    e = EvalConfig()
    p.add_argument("corpus_root", type=Path, metavar="CORPUS_ROOT", help="corpus folder (or CSV/TSV file for --layout manifest)")
    p.add_argument("--layout", default="auto", choices=("auto", "librispeech", "voxceleb1", "voxceleb2", "speaker_folders", "manifest"),
                   help="corpus layout (default: detected)")
    p.add_argument("--output", required=True, type=Path, metavar="REPORT.json",
                   help="JSON: eer, eer_threshold, min_dcf_0.01, min_dcf_0.05, n_speakers, n_utterances, n_target, n_nontarget")
    p.add_argument("--trials", type=_trials_count, default=e.max_trials, metavar="all|N",
                   help="every pair of different files (all, the default) or a seeded sample of N of them")
    p.add_argument("--trial-seed", type=int, default=e.trial_seed, help="seed of the trial sample (default %(default)s)")
    p.add_argument("--min-coverage", type=float, default=e.min_coverage, help="keep a last partial this full (default %(default)s)")
    p.add_argument("--plots", type=Path, metavar="DIR", help="also write the DET curve, score histograms, UMAP and similarity matrix here")
    _embedder_arguments(p)


@command("evaluate", "speaker verification EER and minDCF of a checkpoint on a corpus", _evaluate_arguments)
def _evaluate(args: argparse.Namespace) -> int:
    from spkenc.config import EvalConfig
    from spkenc.inference import pretrained_checkpoint
    from spkenc.verification import evaluate_corpus, write_report_json, write_report_plots

    try:
        config = EvalConfig(max_trials=args.trials, trial_seed=args.trial_seed, rate=args.rate, min_coverage=args.min_coverage)
        checkpoint = args.checkpoint or pretrained_checkpoint()
        report, embedded = evaluate_corpus(args.corpus_root, checkpoint, layout=args.layout, config=config,
                                           device=args.device, batch_size=args.batch_size, precision=args.precision)
    except (ValueError, OSError, RuntimeError) as error:  # CheckpointError and AudioError are ValueErrors
        log.error("%s", error)
        return 1
    for failure in embedded.failures:
        log.warning("skipped %s: %s", failure["path"], failure["reason"])
    write_report_json(report, args.output)
    if args.plots is not None:
        for path in write_report_plots(report, embedded, args.plots).values():
            log.info("wrote %s", path)
    log.info("EER %.2f%% at %.4f, minDCF %s; %d speakers, %d utterances (%d skipped), %d target / %d non-target trials: %s",
             100 * report.eer, report.eer_threshold, ", ".join(f"{v:.4f} at {p:g}" for p, v in sorted(report.min_dcf.items())),
             report.n_speakers, report.n_utterances, len(embedded.failures), report.n_target, report.n_nontarget, args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spkenc", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, run in _COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
