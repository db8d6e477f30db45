"""Multi-GPU execution under torchrun: sequence parallelism, sharding, CFG and expert parallelism."""
