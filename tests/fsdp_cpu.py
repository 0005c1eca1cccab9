"""`python -m sftools` with accelerate's FSDP2 path turned on for CPU processes.

accelerate builds FSDP only on accelerators (MULTI_CPU ignores the FSDP plugin), while the tests run
on gloo CPU processes. This launcher, for tests only, turns a MULTI_CPU state into FSDP with the
plugin recipes/accelerate/fsdp2.yaml describes (FSDP2, one unit per WanTransformerBlock), so the
trainer's FSDP code (accelerate.prepare of model and optimizers, reduce-scattered gradients, gathered
checkpoints) runs as it would on GPUs. torch's FSDP2 itself works on gloo.
"""

import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = AcceleratorState.__init__


def _as_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                          transformer_cls_names_to_wrap=["WanTransformerBlock"])


AcceleratorState.__init__ = _as_fsdp

if __name__ == "__main__":
    from sftools.cli.main import main

    sys.exit(main())
