"""``ovseg demo``: the full pipeline on the embedded sample with random-weight backbones."""

from __future__ import annotations

import time
from pathlib import Path

from flows.config import load_experiment
from flows.pipeline import run_experiment
from flows.summary import print_summary

REPO = Path(__file__).resolve().parents[1]
DEMO_EXPERIMENT = REPO / "configs" / "demo.yaml"
BANNER = (
    "RANDOM WEIGHTS: the demo uses randomly initialised CLIP / DINO / SAM networks of the real architectures\n"
    "(pretrained weights cannot be downloaded here). Its scores are at chance level and are NOT method results."
)


def run_demo(store: str | None = None, out: str = "demo-out", progress: bool = True, orchestrate: bool = True) -> int:
    """Run ``configs/demo.yaml`` (all stages, CorrCLIP, SC-CLIP and the baselines), then write the report.

    ``orchestrate`` makes the run a Prefect flow run (False: no Prefect); the report is written
    by the run itself (a Prefect artifact names it).
    """
    if not DEMO_EXPERIMENT.is_file():
        raise FileNotFoundError(f"{DEMO_EXPERIMENT} not found: run the demo from a clone of the ovseg repository")
    exp = load_experiment(DEMO_EXPERIMENT)
    if store:
        exp = exp.model_copy(update={"store": store})
    print(BANNER + "\n")
    t0 = time.time()
    summary = run_experiment(exp, progress=progress, experiment_file=str(DEMO_EXPERIMENT), orchestrate=orchestrate,
                             report_dir=out)
    print_summary(summary)
    print()
    for m in summary.metrics:
        if m["class_index"] == -1:
            miou = "nan" if m["miou"] is None else f"{100 * m['miou']:.2f}"
            print(f"  {m['dataset']:20s} {m['method']:12s} mIoU {miou:>6s}  [random weights: meaningless]")
    print(f"\ndemo finished in {time.time() - t0:.0f} s; store: {summary.store}")
    print(f"report: {Path(summary.report).resolve()}")
    print("\n" + BANNER)
    return summary.exit_code
