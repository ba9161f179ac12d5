"""Training metrics: model FLOPs, step throughput/MFU, and the per-step JSONL/console/wandb logger.

Importing this package does not import torch (the report tool uses it on machines without one).
"""
from mora_dist.metrics.flops import (DecoderShape, adapter_flops_per_token, flops_per_token,
                                     forward_flops_per_token, full_ft_flops_per_token, matmul_params)
from mora_dist.metrics.jsonl import MetricsFile, read_metrics
from mora_dist.metrics.logger import METRICS_FILE, RUN_FILE, MetricsLogger
from mora_dist.metrics.throughput import H100_BF16_DENSE_PEAK, H100_BF16_MEASURED_PEAK, StepMeter, peak_memory_bytes

__all__ = [
    "DecoderShape", "matmul_params", "forward_flops_per_token", "full_ft_flops_per_token",
    "adapter_flops_per_token", "flops_per_token", "StepMeter", "H100_BF16_DENSE_PEAK", "H100_BF16_MEASURED_PEAK",
    "peak_memory_bytes", "MetricsLogger", "METRICS_FILE", "RUN_FILE", "read_metrics", "MetricsFile",
]
