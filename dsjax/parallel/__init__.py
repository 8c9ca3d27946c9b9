"""Distributed training: the device mesh, logical sharding rules, pipeline parallelism,
multi-host start-up, and compressed gradient exchange."""
