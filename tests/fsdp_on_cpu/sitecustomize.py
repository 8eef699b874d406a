"""Let accelerate run FSDP on CPU processes, for tests only (on ``PYTHONPATH``, Python imports
this file at start-up in every process the launcher starts).

accelerate turns FSDP on only for GPU-like devices: on CPUs it quietly trains data-parallel
instead. This lifts that one check, so that everything after it runs as on GPUs: accelerate's
FSDP 2 preparation (``fully_shard`` over gloo), the trainers, and align. Nothing else changes.
"""

import os

if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    _initialise = AcceleratorState.__init__

    def _initialise_with_fsdp_on_cpu(self, *args, **kwargs):
        _initialise(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()

    AcceleratorState.__init__ = _initialise_with_fsdp_on_cpu
