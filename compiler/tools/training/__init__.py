"""The spec's `train:` section made real: the optimizer and schedule it names, and `epicycle train`.

`build_optimizer` and `clip_gradients` (`optimizers.py`, with the loop they serve) are the parts
for a loop of your own; `train(...)` is that loop (nanoGPT's train.py is the model): every output
trained with the loss `train.losses` gives it (cross-entropy, MSE, Huber, angular), bf16 autocast
and fused AdamW on a GPU, periodic validation, and checkpoints that resume step for step (weights,
optimizer, schedule, RNG states, data position, vocabulary; `compiler.tools.checkpoint`). Under `torchrun` it runs data parallel, with DDP or FSDP2
(`fully_shard`): every rank draws the same global batch and trains on its slice, rank 0 alone
writes. It reports through a callback and `DIR/metrics.jsonl`; progress display is the CLI's.

One module per job; this package re-exports their public names:

* `optimizers`: `build_optimizer`, `clip_gradients`;
* `settings`: `RunOptions` (one run's command-line options), the device and precision they
  resolve to, `effective_train`;
* `objective`: each output's loss and weight (`Task`), the objective module, level-trained fractals;
* `losses`: chunked cross-entropy, MSE, Huber, the angular loss;
* `processes`: the `torchrun` process group, DDP/FSDP wrapping, gathered parameters;
* `resume`: checkpoints of a run and resuming from them step for step;
* `metrics`: `metrics.jsonl` records and the loss curve;
* `loop`: `train`, with validation.

The modules import each other directly, never this package, so re-exporting makes no circle.
"""

# `name as name`: public before the split, importable from here as before, outside `__all__`
from compiler.tools.training.loop import train
from compiler.tools.training.metrics import LOSS_CURVE as LOSS_CURVE
from compiler.tools.training.metrics import METRICS as METRICS
from compiler.tools.training.metrics import plot_loss_curve
from compiler.tools.training.objective import Task, training_task
from compiler.tools.training.objective import level_trained_fractals as level_trained_fractals
from compiler.tools.training.optimizers import build_optimizer, clip_gradients
from compiler.tools.training.processes import Processes as Processes
from compiler.tools.training.processes import gathered as gathered
from compiler.tools.training.processes import start_processes as start_processes
from compiler.tools.training.processes import wrap as wrap
from compiler.tools.training.resume import spec_differences as spec_differences
from compiler.tools.training.settings import RunOptions, UsageError
from compiler.tools.training.settings import effective_train as effective_train

__all__ = [
    "RunOptions",
    "Task",
    "UsageError",
    "build_optimizer",
    "clip_gradients",
    "plot_loss_curve",
    "train",
    "training_task",
]
