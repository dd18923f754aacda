"""EER of every backup of a training run on one corpus's held-out speakers, a line per checkpoint.

    python recipes/score_backups.py work/models/scratch --corpus speechocean762_train

Each RUN_DIR stands for its `backups/encoder_*.pt` and its `encoder.pt`; a `.pt` file stands for
itself. Each checkpoint embeds the held-out utterances (the `heldout` split of
work/corpora/CORPUS/manifest.parquet) and is scored with the functions the Dagster evaluation
assets call (`embed_manifest`, `evaluate_embedded`, `EvalConfig`'s partial slicing and trials),
so a line gives the figure `recipes/evaluate.sh` gives for that file, without a Dagster run and
an MLflow child run per checkpoint. A checkpoint that cannot be loaded is reported by name and
the others are still scored (exit status 1 then).
"""

import argparse
import os
import re
import sys
from pathlib import Path


def checkpoints(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted((path / "backups").glob("encoder_*.pt"))
            found += [path / "encoder.pt"] if (path / "encoder.pt").is_file() else []
        else:
            found.append(path)
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR_OR_CKPT")
    parser.add_argument("--corpus", required=True, help="registered corpus whose held-out speakers are scored")
    parser.add_argument("--work-dir", type=Path, default=Path(os.environ.get("SPKENC_WORK_DIR", "work")))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)

    from spkenc.checkpoint import CheckpointError
    from spkenc.config import EvalConfig
    from spkenc.inference import Embedder, thread_limits
    from spkenc.verification import embed_manifest, evaluate_embedded, manifest_rows

    manifest = args.work_dir / "corpora" / args.corpus / "manifest.parquet"
    try:
        rows = manifest_rows([manifest], split="heldout")
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 1
    if not rows:
        print(f"{manifest}: no held-out speakers (heldout_fraction 0?)", file=sys.stderr)
        return 1
    config, reported = EvalConfig(), set()

    failed = False
    for run in args.runs:
        if run.is_dir() and not checkpoints([run]):
            print(f"{run}: no encoder.pt or backups/encoder_*.pt to score", file=sys.stderr)
            failed = True
    with thread_limits(args.threads):
        for path in checkpoints(args.runs):
            try:
                embedder = Embedder.from_checkpoint(path, device="cpu")
            except (CheckpointError, OSError) as error:
                print(f"{path}: not scored, {error}", file=sys.stderr)
                failed = True
                continue
            embedded = embed_manifest(embedder, rows, rate=config.rate, min_coverage=config.min_coverage)
            for failure in embedded.failures:
                if failure["path"] not in reported:
                    reported.add(failure["path"])
                    print(f"{failure['reason']} (left out)", file=sys.stderr)
            report = evaluate_embedded(embedded, config)
            step = re.search(r"encoder_(\d+)\.pt$", path.name)
            print(f"{path}\t{int(step.group(1)) if step else '-'}\tEER {100 * report.eer:.2f}%\t"
                  f"{report.n_speakers} speakers\t{report.n_utterances} utterances", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
