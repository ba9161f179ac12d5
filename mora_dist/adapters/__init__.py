"""Adapters: one module per method, each with its config class (its `adapter.*` keys) and its math.
Each computes its update on the rank's local shard of a linear layer and can return that shard of
the dense update (`delta_weight`) for exact merging."""
from mora_dist.adapters.base import Adapter, AdapterConfig, MethodConfig, Shard, build_adapter
from mora_dist.adapters.lora import LoRA, LoRAConfig
from mora_dist.adapters.mora import MoRA, MoRAConfig, mora_rank
from mora_dist.adapters.vera import VeRA, VeRAConfig

__all__ = ["Adapter", "AdapterConfig", "MethodConfig", "Shard", "build_adapter", "LoRA", "LoRAConfig", "MoRA",
           "MoRAConfig", "VeRA", "VeRAConfig", "mora_rank"]
