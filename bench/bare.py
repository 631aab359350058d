"""Bare computations of the benchmark: the model stages' own ``compute`` functions without store, leases or Prefect.

For one stage node of a finished run, every image's inputs are loaded untimed with the stage's
own ``load`` (image decode, windows, upstream outputs read from the store), grouped as the
executor groups them (``tasks.streams.Grouper``: items whose windows fill ``window_batch``; each
forward holds one image's windows), then only the stage's ``compute`` calls are timed, with the same cached model
objects (``Stage.models`` -> ``tasks.runtime.get_backbone``). Nothing is re-implemented here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tasks.streams import Grouper
from tasks.runtime import StageContext
from tasks.stages import STAGES

MODEL_STAGES = ("sam_masks", "dino_features", "vfm_features", "clip_layers", "mask_class_tokens", "reconstruction")


@dataclass(frozen=True)
class BareResult:
    """Timed bare work of one stage node over a set of images."""

    seconds: float  # summed wall time of the timed compute calls
    cpu_seconds: float  # summed process CPU time (all threads) of the timed calls
    images: int  # images measured
    windows: int  # model windows measured (images for sam_masks: SAM sees the whole image)
    flops_per_window: float | None  # FLOPs per window, counted on the first group (None when not counted)


def bare_stage(ctx: StageContext, rows: Sequence[Mapping[str, Any]],
               count_flops_fn: Callable[[Callable[[], object]], int] | None = None) -> BareResult:
    """Time the stage's ``compute`` for ``ctx.node`` on ``rows`` (inputs loaded untimed by the stage's ``load``).

    Args:
        ctx: the node of a run that completed in the context's store (its upstream outputs are read).
        rows: manifest rows of the images to measure.
        count_flops_fn: when given, counts the FLOPs of the first group's computation (run once more, untimed).
    """
    if ctx.stage not in MODEL_STAGES:
        raise ValueError(f"stage {ctx.stage!r} is not a model stage; model stages: {MODEL_STAGES}")
    stage = STAGES[ctx.stage]
    models = stage.models(ctx)
    grouper = Grouper(stage, ctx.settings.window_batch)
    groups = []
    for row in rows:
        if (group := grouper.add(row, stage.load(ctx, row))) is not None:
            groups.append(group)
    if (group := grouper.flush()) is not None:
        groups.append(group)
    seconds, cpu, windows = 0.0, 0.0, 0
    flops_per_window = None
    with torch.inference_mode():
        for i, group in enumerate(groups):
            inputs = [inp for _, inp in group]
            n_win = sum(stage.windows(inp) for inp in inputs) if stage.windows else len(inputs)
            t0, c0 = time.perf_counter(), time.process_time()
            stage.compute(ctx, models, inputs)
            seconds += time.perf_counter() - t0
            cpu += time.process_time() - c0
            windows += n_win
            if i == 0 and count_flops_fn is not None:
                flops_per_window = count_flops_fn(lambda: stage.compute(ctx, models, inputs)) / n_win
    return BareResult(seconds, cpu, len(rows), windows, flops_per_window)
