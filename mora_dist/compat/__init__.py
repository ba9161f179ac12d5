"""Process-wide compatibility shims, applied once and explicitly by a process's entry point.

`mcore_cpu.apply()` lets megatron-core 0.16 run on a CPU-only torch with gloo (it patches torch's
tensor factories, `Tensor.cuda` and megatron's CUDA RNG helpers, and is a no-op when CUDA is
available). Entry points call it first: launch/train.py, launch/merge.py, launch/ray_job.py's
workers, launch/bench.py, launch/research/common.py and the test harness (tests/dist.py,
tests/conftest.py). Library code never applies it; `mcore_cpu.require()` names the missing call.
"""
