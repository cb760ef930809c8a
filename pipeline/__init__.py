"""Stage-agnostic runtime: config, run directory, shards, completion markers, locks,
executors (local, ray) and status. Never imports ``llavadi.stages``."""
