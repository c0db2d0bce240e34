"""Scale-out on Ray: the same extraction and probes, fanned out over the workers of a Ray cluster.

Nothing here imports Ray at module level: `forethought extract` and `forethought probe` without `--ray` never
load it, and Ray stays an optional extra (`pip install "forethought[ray]"`).

- `cluster`: `--ray ADDRESS|auto|local:N` -> a connected Ray session (started and shut down for `local:N`).
- `extract`: shards of the activation store computed by Ray tasks; the driver stays the one writer of shards
  and manifest (`forethought.data.store.extract` with a `shard_runner`), so the store is byte-identical.
- `probes`: (layer, offset) cells fitted on Ray workers that each load the store and model once, merged in
  (layer, offset) order.
"""
