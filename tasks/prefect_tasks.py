"""The Prefect tasks of the pipeline: a batch of one stage output set, or a fused chain batch of several
(never one task per image)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.chain import run_chain
from tasks.executor import run_batch
from tasks.runtime import BatchResult, StageContext


@task(name="stage-batch", cache_policy=NO_CACHE)
def stage_batch(ctx: StageContext, rows: list[dict[str, Any]]) -> BatchResult:
    """One batch of one stage output set: ``tasks.executor.run_batch`` on a worker."""
    return run_batch(ctx, rows)


@task(name="chain-batch", cache_policy=NO_CACHE)
def chain_batch(ctxs: list[StageContext], rows: list[list[dict[str, Any]]]) -> list[BatchResult]:
    """One batch of images through several stage output sets on one worker: ``tasks.chain.run_chain``."""
    return run_chain(ctxs, rows)
