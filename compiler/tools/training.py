"""The spec's `train:` section made real: the optimizer and schedule it names, and `epicycle train`.

    model = compiler.build_model("specs/components.yaml")
    optimizer, schedule = compiler.build_optimizer(model)
    for step in range(model.spec.train.steps):
        loss = task_loss(model(batch)) + model.auxiliary_loss(step)
        loss.backward()
        clip_gradients(model)
        optimizer.step(); schedule.step(); optimizer.zero_grad()

Optimizers and schedules are registry components (`compiler.language.registry`): `adamw`, `sgd`, `fam`
(frequency-adaptive momentum, docs/designs.md, design 003), `constant`, `warmup_cosine`, or others.

`train(...)` is that loop for character-level language modelling (nanoGPT's train.py is the
model): a spec whose `lm_head` reads a `tokens` input, a UTF-8 corpus, periodic validation, and
checkpoints that resume step for step (weights, optimizer, schedule, RNG states, data position,
vocabulary; `compiler.tools.checkpoint`). Under `torchrun` it runs data parallel, with DDP or FSDP2
(`fully_shard`): every rank draws the same global batch and trains on its slice, rank 0 alone
writes. It reports through a callback and `DIR/metrics.jsonl`; progress display is the CLI's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compiler.language.diagnostics import Diagnostic, Span, SpecError
from compiler.language.registry import REGISTRY

if TYPE_CHECKING:  # torch loads on first use: `epicycle validate` never needs it
    import torch
    from torch import Tensor, nn

    from compiler.ir import IR
    from compiler.tools.data import Corpus

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"


def build_optimizer(model: nn.Module, train: Any = None) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer and learning-rate schedule of `train` (default: the model's spec's section)."""
    from compiler.components import AdamW, Constant

    train = train if train is not None else model.spec.train
    chosen = train.optimizer if train.optimizer is not None else AdamW()
    optimizer = REGISTRY.get("optimizer", chosen.kind).build(model, **chosen.options())
    schedule = train.schedule if train.schedule is not None else Constant()
    scheduler = REGISTRY.get("schedule", schedule.kind).build(
        optimizer, train.steps, **schedule.options()
    )
    return optimizer, scheduler


def clip_gradients(model: nn.Module, train: Any = None) -> torch.Tensor | None:
    """Clip the global gradient norm to the spec's `grad_clip` (nothing when it is null)."""
    import torch

    train = train if train is not None else model.spec.train
    if train.grad_clip is None:
        return None
    return torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class RunOptions:
    """How one `epicycle train` invocation runs; the rest comes from the spec's `train:`."""

    data: str
    out: str
    resume: str | None = None
    stop_at: int | None = None  # stop after this step; the schedule still spans `steps`
    log_every: int = 10
    eval_batches: int = 8
    device: str = "cpu"
    compile: bool = False
    strategy: str = "auto"  # auto | none | ddp | fsdp


def effective_train(ir: IR, **overrides: Any) -> Any:
    """The spec's `train:` section with command-line values (those not None) put over it; `lr`
    replaces the optimizer's learning rate."""
    from compiler.components import AdamW
    from compiler.language.spec import Train

    train = ir.spec.train
    lr = overrides.pop("lr", None)
    values = {k: v for k, v in overrides.items() if v is not None}
    if lr is not None:
        optimizer = train.optimizer if train.optimizer is not None else AdamW()
        values["optimizer"] = optimizer.model_copy(update={"lr": float(lr)})
    train = Train.model_validate({**dict(train), **values})
    schedule = train.schedule
    warmup = getattr(schedule, "warmup", 0)
    if warmup > train.steps:
        raise SpecError(
            [
                ir.error(
                    ("train", "schedule"),
                    f"a warm-up of {warmup} steps is longer than the {train.steps} training steps",
                    "train for more `--steps` or shorten the schedule's `warmup`",
                )
            ]
        )
    return train


@dataclass(frozen=True)
class LanguageTask:
    """What `train` needs from a spec: one `tokens` input and the `lm_head` outputs over it."""

    input: str
    outputs: tuple[str, ...]
    vocab: int
    context: int


def language_task(ir: IR) -> LanguageTask:
    """The spec's token input and LM heads, or a located error saying what `train` needs."""
    needs = "`epicycle train` needs one `{kind: tokens}` input and `kind: lm_head` outputs"
    inputs = ir.spec.inputs
    if len(inputs) != 1 or next(iter(inputs.values())).kind != "tokens":
        kinds = ", ".join(f"{n} ({i.kind})" for n, i in inputs.items())
        raise SpecError(
            [
                ir.error(
                    ("inputs",),
                    f"this spec's inputs are {kinds}; {needs}",
                    "train this spec with your own loop (see `compiler.tools.training`)",
                    key=True,
                )
            ]
        )
    name, spec = next(iter(inputs.items()))
    others = [n for n, o in ir.spec.outputs.items() if o.kind != "lm_head"]
    heads = tuple(n for n, o in ir.spec.outputs.items() if o.kind == "lm_head")
    if others or not heads:
        where = ("outputs", others[0]) if others else ("outputs",)
        raise SpecError(
            [
                ir.error(
                    where,
                    f"output `{others[0]}` is `kind: {ir.spec.outputs[others[0]].kind}`; {needs}"
                    if others
                    else f"this spec has no `lm_head` output; {needs}",
                    "character-level training predicts the next token: read it out with an lm_head",
                    key=True,
                )
            ]
        )
    return LanguageTask(name, heads, spec.vocab, spec.context)


def check_vocabulary(ir: IR, task: LanguageTask, corpus: Corpus) -> None:
    if corpus.characters > task.vocab:
        raise SpecError(
            [
                ir.error(
                    ("inputs", task.input, "vocab"),
                    f"`vocab: {task.vocab}` is smaller than the {corpus.characters} distinct "
                    f"characters of {corpus.path}",
                    f"set `vocab: {corpus.characters}` (or more) on input `{task.input}`",
                )
            ]
        )


def spec_differences(ir: IR, checkpoint_text: str, checkpoint: str) -> list[Diagnostic]:
    """Where the spec differs from the one embedded in a checkpoint, each located in the spec.
    The `train:` section may change between runs (more steps, another learning rate)."""
    from compiler.language.frontend import load_spec_text

    saved = load_spec_text(checkpoint_text, f"{checkpoint}#spec").spec
    old = saved.model_dump(mode="json", by_alias=True, exclude={"train"})
    new = ir.spec.model_dump(mode="json", by_alias=True, exclude={"train"})
    return [
        ir.error(
            path,
            f"`{'.'.join(map(str, path))}` is {_show(b)} here but {_show(a)} in the checkpoint "
            f"being resumed ({checkpoint})",
            "resume with the spec the checkpoint was trained from (its text is in "
            f"{Path(checkpoint) / 'spec.yaml'}), or start a new run without `--resume`",
        )
        for path, a, b in _differences(old, new, ())
    ]


def _differences(old: Any, new: Any, path: tuple) -> Iterator[tuple[tuple, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            yield from _differences(old.get(key), new.get(key), (*path, key))
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            yield from _differences(a, b, (*path, i))
    elif old != new:
        yield path, old, new


def _show(value: Any) -> str:
    return "absent" if value is None else json.dumps(value)


# --------------------------------------------------------------------------- the objective


def _language_model_loss_class():
    import torch.nn.functional as F
    from torch import nn

    class LanguageModelLoss(nn.Module):
        """Next-token cross-entropy of the spec's LM heads plus the spec's training terms, in one
        forward, so DDP and FSDP see the whole step. Every fractal node trains all its levels at
        once (design 001), weighted by its `level_weights`: an output that reads a fractal alone
        is scored through that fractal's view, the other outputs through the model's forward."""

        def __init__(self, model: nn.Module, task: LanguageTask):
            super().__init__()
            self.model, self.task = model, task
            self.fractals = level_trained_fractals(model)
            self.scored_by = {o: view for view in self.fractals.values() for o in view.outputs}

        def forward(self, tokens: Tensor, targets: Tensor, step: int) -> tuple[Tensor, Tensor]:
            plain = [o for o in self.task.outputs if o not in self.scored_by]
            logits = self.model(tokens) if plain else {}
            losses = [
                self.scored_by[o].loss(targets, tokens, output=o)[0]
                if o in self.scored_by
                else F.cross_entropy(logits[o].flatten(0, -2), targets.flatten())
                for o in self.task.outputs
            ]
            task_loss = sum(losses) / len(losses)
            # the caller detaches the task loss: returned detached from a compiled step beside a
            # sum it shares a node with (when the spec has no training terms, `+ 0`), inductor
            # in torch 2.13 handed back the total without its graph
            return task_loss + self.model.auxiliary_loss(step), task_loss

    return LanguageModelLoss


def level_trained_fractals(model: nn.Module) -> dict[str, Any]:
    """The fractal nodes whose levels train at once, by name, with their views. A fractal that
    cannot run its levels alone (it receives messages, or no output reads it alone) trains as one
    model; the log says why."""
    views = {}
    for node in model.nodes():
        if not node.nests:
            continue
        if node.fractal_problem is not None:
            log.warning(
                "fractal `%s` trains without level losses: %s", node.name, node.fractal_problem
            )
            continue
        views[node.name] = node.fractal
    return views


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Processes:
    """This process's place in a `torchrun` launch (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    strategy: str = "none"

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def mean(self, value: Tensor) -> float:
        """The mean of a scalar over all ranks."""
        if self.world == 1:
            return float(value)
        import torch.distributed as dist

        value = value.detach().clone().float().to(self.device)
        dist.all_reduce(value)
        return float(value) / self.world


def start_processes(device: str, strategy: str) -> Processes:
    """Join the process group `torchrun` set up (nccl on CUDA, gloo on CPU), or run alone."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if world == 1:  # one process: nothing to replicate or shard
        if strategy in ("ddp", "fsdp"):
            log.warning(
                "--strategy %s needs torchrun with several processes; running alone", strategy
            )
        return Processes(device=device)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Processes(rank, world, device, strategy)


def wrap(objective: nn.Module, processes: Processes) -> nn.Module:
    """DDP or FSDP2 around the objective. FSDP shards each transformer block as its own unit when
    nothing outside a block's forward reads its weights (training terms and fractal views do),
    else the whole model as one unit (ZeRO-3 over one group)."""
    if processes.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [processes.device] if processes.device.startswith("cuda") else None
        return DistributedDataParallel(objective, device_ids=ids)
    if processes.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from runtime.transformer import Block, Transformer

        model = objective.model
        blocks_alone = not objective.fractals and not any(
            hasattr(m, "regularisation") for m in model.modules()
        )
        if blocks_alone:
            for module in model.modules():
                if type(module) is Transformer:
                    for block in module.blocks:
                        if isinstance(block, Block):
                            fully_shard(block)
        fully_shard(objective)
        return objective
    return objective


@contextlib.contextmanager
def gathered(root: nn.Module, processes: Processes) -> Iterator[None]:
    """Full parameters in place for reading outside a forward (FSDP keeps them sharded)."""
    if processes.strategy != "fsdp":
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


# --------------------------------------------------------------------------- the loop


def train(
    spec: str | Path,
    options: RunOptions,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Train `spec` on the text at `options.data`; `overrides` (steps, batch, lr, eval_every,
    val_fraction, seed) go over the spec's `train:`. Returns the records logged by this run."""
    import torch

    from compiler.pipeline import analyze, build_model
    from compiler.tools.checkpoint import load_weights, read_checkpoint_spec, read_training_state
    from compiler.tools.data import load_corpus

    ir = analyze(spec)
    task = language_task(ir)
    settings = effective_train(ir, **overrides)
    out = Path(options.out)
    previous = None
    if options.resume is not None:
        previous = read_training_state(options.resume)
        text, _ = read_checkpoint_spec(options.resume)
        differences = spec_differences(ir, text, options.resume)
        if differences:
            raise SpecError(differences)
    elif (out / "training.safetensors").exists():
        raise SpecError(
            [
                Diagnostic(
                    Span(str(out / "training.safetensors"), 1, 1),
                    "this directory already holds a training checkpoint",
                    f"continue it with `--resume {out}`, or write the new run to another `--out`",
                )
            ]
        )
    vocabulary = previous.state["vocabulary"] if previous else None
    corpus = load_corpus(
        options.data,
        vocabulary=vocabulary,
        val_fraction=settings.val_fraction,
        context=task.context,
    )
    check_vocabulary(ir, task, corpus)
    if previous and previous.state["data"]["sha256"] != corpus.sha256:
        log.warning(
            "resuming on %s, not the text the checkpoint was trained on (%s)",
            corpus.path,
            previous.state["data"]["file"],
        )
    processes = start_processes(options.device, options.strategy)
    if settings.batch % processes.world:
        raise SpecError(
            [
                ir.error(
                    ("train", "batch"),
                    f"a batch of {settings.batch} does not split over {processes.world} processes",
                    f"use a batch divisible by {processes.world}",
                )
            ]
        )
    feedback = ir.spec.feedback
    if processes.strategy == "fsdp" and feedback is not None and feedback.lipschitz is not None:
        raise SpecError(
            [
                ir.error(
                    ("feedback", "lipschitz"),
                    "`lipschitz` measures the loop through a double backward, which cannot reach "
                    "the weights FSDP gathers",
                    "train this spec with `--strategy ddp` (every process holds the weights), or "
                    "remove `lipschitz`",
                    key=True,
                )
            ]
        )
    start = previous.step if previous else 0
    stop = min(options.stop_at or settings.steps, settings.steps)
    if start >= stop:
        raise SpecError(
            [
                Diagnostic(
                    Span(str(Path(options.resume or out) / "training.safetensors"), 1, 1),
                    f"the checkpoint is at step {start} and this run stops at step {stop}: "
                    "nothing to train",
                    "raise `--steps` (the schedule then spans the new length)",
                )
            ]
        )
    _seed_dropout(settings.seed, processes, previous)

    model = build_model(ir, device=processes.device)
    if previous:
        load_weights(model, options.resume, device=processes.device)
    objective = _language_model_loss_class()(model, task)
    root = wrap(objective, processes)
    step_fn = torch.compile(root) if options.compile else root
    optimizer, schedule = build_optimizer(model, settings)
    if previous:
        _restore(root, optimizer, schedule, previous, processes)

    records = _prepare_metrics(out, options.resume, start, processes)
    log.info("training %s from step %d to %d on %s", ir.spec.name, start, stop, corpus.path)
    if on_start is not None and processes.leader:
        on_start(start, stop)
    step, tokens_done, clock = start, 0, time.perf_counter()
    plotted = clock
    while step < stop:
        inputs, targets = _batch(corpus.train, step, settings, task, processes)
        loss, task_loss = step_fn(inputs, targets, step)
        task_loss = task_loss.detach()
        loss.backward()
        clip_gradients(model, settings)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_done += settings.batch * task.context
        evaluate = step % settings.eval_every == 0 or step == stop
        if not (evaluate or step % options.log_every == 0):
            continue
        elapsed = time.perf_counter() - clock
        record = {
            "step": step,
            "loss": processes.mean(task_loss),
            "lr": lr,
            "tokens_per_s": tokens_done / elapsed if elapsed > 0 else 0.0,
        }
        with gathered(root, processes):  # lattice phases read the weights
            report = model.report()  # before validation's forward passes overwrite it
        record.update(_from_report(report, objective, processes))
        if evaluate:
            record["val_loss"] = _validation_loss(
                step_fn, corpus, settings, task, options, processes
            )
        if processes.leader:
            _append_metric(out, record)
            records.append(record)
        if evaluate:
            _save(model, root, optimizer, schedule, step, corpus, settings, processes, out)
            if processes.leader and (step == stop or time.perf_counter() - plotted > 60):
                _plot(records, out / LOSS_CURVE)  # at the end, and each minute
                plotted = time.perf_counter()
        if on_record is not None and processes.leader:
            on_record(record)
        tokens_done, clock = 0, time.perf_counter()
    return [r for r in records if r["step"] > start]


def _batch(ids: Tensor, step: int, settings: Any, task: LanguageTask, processes: Processes):
    from compiler.tools.data import batch_at

    x, y = batch_at(
        ids, step, settings.batch, task.context, settings.seed, (processes.rank, processes.world)
    )
    return x.to(processes.device), y.to(processes.device)


def _validation_loss(
    step_fn: nn.Module,
    corpus: Corpus,
    settings: Any,
    task: LanguageTask,
    options: RunOptions,
    processes: Processes,
) -> float:
    """Mean loss over the same `eval_batches` held-out batches every time (negative batch
    indices: a stream of their own), dropout off; the RNG of training is not touched."""
    import torch

    step_fn.eval()
    total = torch.zeros((), device=processes.device)
    with torch.no_grad():
        for i in range(options.eval_batches):
            x, y = _batch(corpus.val, -1 - i, settings, task, processes)
            total += step_fn(x, y, 0)[1]
    step_fn.train()
    return processes.mean(total / options.eval_batches)


def _from_report(
    report: dict[str, Any], objective: nn.Module, processes: Processes
) -> dict[str, Any]:
    """The metrics.jsonl fields from `GraphModel.report()` of the latest training step:

    * `level_loss`: each fractal's training loss per level (mean over its sub-models and over
      the ranks): a list for a model with one level-trained fractal, `{node: list}` for several;
    * `equilibrium`: the solves (`Federation.solve_report`), under `mode: equilibrium`;
    * `lattice`: `{"NODE.LAYER": metrics}`, every lattice attention layer of every node.
    """
    import torch

    record: dict[str, Any] = {}
    levels = {
        name: [
            processes.mean(torch.tensor(v))
            for v in report["nodes"][name]["fractal"].get("level_loss", [])
        ]
        for name in objective.fractals
    }
    if len(levels) == 1:
        record["level_loss"] = next(iter(levels.values()))
    elif levels:
        record["level_loss"] = levels
    feedback = report.get("feedback")
    if feedback is not None:
        record["equilibrium"] = {k: v for k, v in feedback.items() if k != "mode"}
    lattice = {
        f"{node}.{layer}": metrics
        for node, entry in report["nodes"].items()
        for layer, metrics in entry.get("lattice", {}).items()
    }
    if lattice:
        record["lattice"] = lattice
    return record


def _seed_dropout(seed: int, processes: Processes, previous: Any) -> None:
    """Dropout draws from torch's global generator: seeded per rank, or restored on resume."""
    import torch

    if previous is not None:
        saved = previous.state["rng"]
        if saved["world"] == processes.world:
            rank = f"rng/{processes.rank}"
            torch.set_rng_state(previous.tensors[f"{rank}/cpu"])
            if f"{rank}/cuda" in previous.tensors and processes.device.startswith("cuda"):
                torch.cuda.set_rng_state(previous.tensors[f"{rank}/cuda"])
            return
        log.warning(
            "the checkpoint was trained on %d processes, this run has %d: dropout is reseeded, so "
            "the run will not repeat an uninterrupted one exactly",
            saved["world"],
            processes.world,
        )
        seed = seed + previous.step
    torch.manual_seed(seed + processes.rank)


def _rng_tensors(processes: Processes) -> dict[str, Tensor]:
    """Every rank's generator states, gathered to all (rank 0 writes them)."""
    import torch

    states = {"cpu": torch.get_rng_state()}
    if processes.device.startswith("cuda"):
        states["cuda"] = torch.cuda.get_rng_state()
    if processes.world == 1:
        return {f"rng/0/{k}": v for k, v in states.items()}
    import torch.distributed as dist

    gathered_states = {}
    for kind, state in states.items():
        local = state.to(processes.device)
        parts = [torch.empty_like(local) for _ in range(processes.world)]
        dist.all_gather(parts, local)
        gathered_states.update({f"rng/{r}/{kind}": p.cpu() for r, p in enumerate(parts)})
    return gathered_states


def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _save(model, root, optimizer, schedule, step, corpus, settings, processes, out) -> None:
    """A checkpoint of everything resuming needs; collectives on every rank, files on rank 0."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from compiler.tools.checkpoint import TrainingState, save_checkpoint

    weights = None
    if processes.strategy == "fsdp":
        full = get_model_state_dict(root, options=_state_options())
        weights = {k.removeprefix("model."): v for k, v in full.items()}
    if processes.strategy == "fsdp":
        optimizer_state = get_optimizer_state_dict(root, optimizer, options=_state_options())
    else:
        optimizer_state = _named_optimizer_state(root, optimizer)
    rng = _rng_tensors(processes)
    if not processes.leader:
        return
    state = TrainingState(step)
    state.state["vocabulary"] = corpus.vocabulary
    state.state["data"] = {
        "file": corpus.path,
        "sha256": corpus.sha256,
        "position": step,
        "train_characters": len(corpus.train),
    }
    state.state["settings"] = json.loads(settings.model_dump_json())
    state.state["rng"] = {"world": processes.world}
    state.tensors.update(rng)
    state.pack("optimizer", optimizer_state)
    state.pack("schedule", schedule.state_dict())
    try:
        save_checkpoint(model, out, weights=weights, training=state)
    except OSError as exc:
        raise SpecError(
            [
                Diagnostic(
                    Span(str(out), 1, 1),
                    f"cannot write the checkpoint of step {step}: {exc.strerror or exc}",
                    "the checkpoint already there is unchanged; free space (or choose another "
                    "`--out`) and `--resume` from it",
                )
            ]
        ) from None


def _restore(root, optimizer, schedule, previous, processes) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    saved = previous.unpack("optimizer")
    if processes.strategy == "fsdp":
        set_optimizer_state_dict(root, optimizer, saved, options=_state_options())
    else:
        index = {name: i for i, name in enumerate(_parameter_names(root, optimizer))}
        optimizer.load_state_dict(
            {
                "state": {index[name]: value for name, value in saved["state"].items()},
                "param_groups": [
                    {**group, "params": [index[name] for name in group["params"]]}
                    for group in saved["param_groups"]
                ],
            }
        )
    schedule.load_state_dict(previous.unpack("schedule"))


def _parameter_names(root: nn.Module, optimizer: Any) -> list[str]:
    """The optimizer's parameters in `state_dict` order, by name (as FSDP's state dicts spell
    them), so checkpoints of every strategy read alike."""
    module = getattr(root, "module", root)  # DDP's wrapped module
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _named_optimizer_state(root: nn.Module, optimizer: Any) -> dict[str, Any]:
    names = _parameter_names(root, optimizer)
    state = optimizer.state_dict()
    return {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]}
            for group in state["param_groups"]
        ],
    }


def _prepare_metrics(out: Path, resume: str | None, start: int, processes: Processes) -> list:
    """The records up to `start` (from the run resumed), rewritten to `out/metrics.jsonl`."""
    if not processes.leader:
        return []
    out.mkdir(parents=True, exist_ok=True)
    records = []
    if resume is not None and (Path(resume) / METRICS).exists():
        for line in (Path(resume) / METRICS).read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a crash
                record = json.loads(line)
                if record.get("step", math.inf) <= start:
                    records.append(record)
    temporary = out / f".tmp-{METRICS}"
    temporary.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(temporary, out / METRICS)
    return records


def _append_metric(out: Path, record: dict[str, Any]) -> None:
    with open(out / METRICS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _plot(records: list[dict[str, Any]], path: Path) -> None:
    try:
        plot_loss_curve(records, path)
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", path.name)


def plot_loss_curve(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Training and validation loss over steps, as a PNG (matplotlib's headless Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], label="train", lw=1)
    val = [r for r in records if "val_loss" in r]
    if val:
        axes.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    axes.set(xlabel="step", ylabel="loss (nats per character)", title="epicycle train")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    temporary = path.with_name(f".tmp-{path.name}")
    figure.savefig(temporary, format="png")
    plt.close(figure)
    os.replace(temporary, path)
    return path


__all__ = [
    "LanguageTask",
    "RunOptions",
    "build_optimizer",
    "clip_gradients",
    "language_task",
    "plot_loss_curve",
    "train",
]
