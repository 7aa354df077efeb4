"""KV-cache pruning: policy (plain torch), per-row runtime state, the mace_prune backend."""
