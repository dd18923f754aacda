"""The `corpus` partitions: one dynamic partition per corpus of the registry (corpora.yaml).

Two ways keep the partitions in step with the registry:
- the `corpus_registry_sensor` adds new corpora while `dagster dev` runs;
- `python -m pipelines.corpora sync [--prune]` does it at once on the instance at
  $DAGSTER_HOME, e.g. before `dagster asset materialize --partition <corpus>`.
"""

import argparse
import logging
import sys
from typing import Optional, Sequence

import dagster as dg

from pipelines.resources import SpkencPaths

log = logging.getLogger(__name__)

corpus_partitions = dg.DynamicPartitionsDefinition(name="corpus")


def registered_corpora(paths: SpkencPaths) -> list[str]:
    """Names of the registry's corpora, in file order."""
    from spkenc.corpus import load_registry

    return list(load_registry(paths.registry_path()))


def partition_changes(registered: Sequence[str], existing: Sequence[str]) -> tuple[list[str], list[str]]:
    """(keys to add, keys no longer registered).

    >>> partition_changes(["a", "b"], ["b", "c"])
    (['a'], ['c'])
    """
    return [n for n in registered if n not in existing], [k for k in existing if k not in registered]


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def corpus_registry_sensor(context: dg.SensorEvaluationContext, paths: SpkencPaths) -> dg.SensorResult:
    """Add a `corpus` partition for each registered corpus that has none yet."""
    existing = context.instance.get_dynamic_partitions(corpus_partitions.name)
    added, stale = partition_changes(registered_corpora(paths), existing)
    if stale:
        context.log.info(f"partitions no longer in the registry (kept; prune with `python -m pipelines.corpora sync --prune`): {stale}")
    if not added:
        return dg.SensorResult(skip_reason=f"all {len(existing)} registered corpora have partitions")
    return dg.SensorResult(dynamic_partitions_requests=[corpus_partitions.build_add_request(added)])


def sync(instance: dg.DagsterInstance, paths: SpkencPaths, prune: bool = False) -> tuple[list[str], list[str]]:
    """Add missing corpus partitions (and with `prune` delete unregistered ones) on `instance`.
    Returns (added, removed)."""
    existing = instance.get_dynamic_partitions(corpus_partitions.name)
    added, stale = partition_changes(registered_corpora(paths), existing)
    if added:
        instance.add_dynamic_partitions(corpus_partitions.name, added)
    removed = stale if prune else []
    for key in removed:
        instance.delete_dynamic_partition(corpus_partitions.name, key)
    return added, removed


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.corpora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sync_parser = sub.add_parser("sync", help="add a partition per registered corpus to the instance at $DAGSTER_HOME")
    sync_parser.add_argument("--prune", action="store_true", help="also delete partitions of corpora no longer registered")
    sub.add_parser("list", help="print the registered corpora and their roots")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = SpkencPaths()
    try:
        if args.command == "list":
            from spkenc.corpus import load_registry

            for spec in load_registry(paths.registry_path()).values():
                sys.stdout.write(f"{spec.name}\t{spec.layout}\t{spec.role}\t{spec.root}\n")
            return 0
        with dg.DagsterInstance.get() as instance:
            added, removed = sync(instance, paths, prune=args.prune)
    except (FileNotFoundError, ValueError, dg.DagsterInvariantViolationError) as error:
        log.error("%s", error)
        return 1
    log.info("corpus partitions: added %s, removed %s (registry %s)", added, removed, paths.registry_path())
    return 0


if __name__ == "__main__":
    sys.exit(main())
