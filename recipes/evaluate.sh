#!/usr/bin/env bash
# EER of one checkpoint on the held-out speakers of each corpus, through the Dagster evaluation
# assets (evaluation_embeddings -> verification_report), one materialization per corpus, each
# logged to MLflow. Prints one line per corpus and copies each report.json to OUT_DIR.
#
#   SPKENC_CORPORA=recipes/shared_corpora.yaml bash recipes/evaluate.sh CHECKPOINT OUT_DIR CORPUS...
#
# Needs the activated project environment (DAGSTER_HOME and the dagster module are set there)
# and the corpora's raw_corpus/trimmed_wavs/mel_shards partitions materialized.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CHECKPOINT OUT_DIR CORPUS..." >&2
    exit 2
fi
checkpoint=$(realpath "$1")
out_dir=$2
shift 2
[ -f "$checkpoint" ] || { echo "$checkpoint: no such checkpoint" >&2; exit 1; }
mkdir -p "$out_dir"
work_dir=${SPKENC_WORK_DIR:-$(pwd)/work}
for corpus in "$@"; do
    config="{\"ops\": {\"evaluation_embeddings\": {\"config\": {\"checkpoint\": \"$checkpoint\", \"corpora\": [\"$corpus\"]}}}}"
    if ! dagster asset materialize --select evaluation_embeddings,verification_report --config-json "$config" \
            > "$out_dir/$corpus.log" 2>&1; then
        echo "$corpus: evaluation failed, see $out_dir/$corpus.log" >&2
        exit 1
    fi
    cp "$work_dir/eval/report.json" "$out_dir/$corpus.json"
    python - "$out_dir/$corpus.json" "$corpus" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]}\tEER {100 * report['eer']:.2f}%\t{report['n_speakers']} speakers\t{report['n_utterances']} utterances")
EOF
done
