#!/usr/bin/env bash
# Creates .venv with spkenc and its Dagster/MLflow pipeline; `--test` adds the test tools.
# Safe to rerun. After it, `. .venv/bin/activate` gives the project's environment:
# DAGSTER_HOME (absolute) and the module that `dagster asset materialize` loads.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

python=$(command -v python3.11 || command -v python3)
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"spkenc needs Python 3.11, found {sys.version}"'
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

extras="pipeline"
if [ "${1:-}" = "--test" ]; then extras="pipeline,test"; fi
python -m pip install --quiet -e ".[$extras]"
if [ "${1:-}" = "--test" ]; then
    # The parity reference. It depends on plain webrtcvad, which breaks on import here;
    # webrtcvad-wheels (already installed) provides the same module.
    python -m pip install --quiet --no-deps "resemblyzer==0.1.4"
fi

# The project's environment, set on activation (replaced on every run of this script).
marker="# spkenc environment"
sed -i "/^$marker/,\$d" .venv/bin/activate
cat >> .venv/bin/activate <<ENV
$marker
export DAGSTER_HOME="$root/dagster_home"
export DAGSTER_CLI_ASSET_MATERIALIZE_MODULE_NAME="pipelines.definitions"
export SPKENC_WORK_DIR="\${SPKENC_WORK_DIR:-$root/work}"
ENV
mkdir -p dagster_home
echo "spkenc is set up: . .venv/bin/activate"
