"""The one Prefect task of the pipeline: a batch of one stage output set (never one task per image)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.executor import run_batch
from tasks.runtime import BatchResult, StageContext


@task(name="stage-batch", cache_policy=NO_CACHE)
def stage_batch(ctx: StageContext, rows: list[dict[str, Any]]) -> BatchResult:
    """One batch of one stage output set: ``tasks.executor.run_batch`` on a worker."""
    return run_batch(ctx, rows)
