"""Devices: the (data, fsdp, tensor) mesh, the one sharding table, and multi-host start-up."""

from jaxzero.parallel.sharding import FSDP_TP, ShardingConfig, make_mesh, put_global, to_host

__all__ = ["FSDP_TP", "ShardingConfig", "make_mesh", "put_global", "to_host"]
