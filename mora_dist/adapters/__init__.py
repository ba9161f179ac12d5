"""Adapters: one module per method. Each computes its update on the rank's local shard of a linear
layer and can return that shard of the dense update (`delta_weight`) for exact merging."""
from mora_dist.adapters.base import Adapter, AdapterConfig, Shard, build_adapter
from mora_dist.adapters.lora import LoRA
from mora_dist.adapters.mora import MoRA, mora_rank
from mora_dist.adapters.vera import VeRA

__all__ = ["Adapter", "AdapterConfig", "Shard", "build_adapter", "LoRA", "MoRA", "VeRA", "mora_rank"]
