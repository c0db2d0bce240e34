"""Scale-out on Ray: the same extraction and probes, fanned out over the workers of a Ray cluster.

Nothing here imports Ray at module level: `forethought extract` and `forethought probe` without `--ray` never
load it, and Ray stays an optional extra (`pip install "forethought[ray]"`).

- `cluster`: `--ray ADDRESS|auto|local:N` -> a connected Ray session (started and shut down for `local:N`).
- `extract`: shards of the activation store computed by Ray tasks; the driver stays the one writer of shards
  and manifest (`forethought.data.store.extract` with a `shard_runner`), so the store is byte-identical.
- `probes`: one Ray task per layer (all its offsets), each worker loading the store, model and shared baselines
  once; the driver merges them with the summary over all layers (layer chosen on validation, intervals), so
  the result equals `run_probes`'.
"""
