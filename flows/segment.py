"""``ovseg segment IMAGE --classes "cat; dog, puppy; grass"``: one image, a custom vocabulary.

The image goes through the same stages as any dataset (its features are cached in the store
under its content-hash id, so a second vocabulary or method reuses them); the label map and
an overlay with a class legend are written next to ``--out``.

Without a configured Prefect API (``PREFECT_API_URL``) the image runs without Prefect (the same
executor, no server start-up: model time plus about a second); with one, it is a flow run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flows.config import parse_experiment
from flows.graph import build_plan
from flows.overlay import render_overlay_figure
from flows.pipeline import run_experiment
from flows.prefect_settings import prefect_configured
from ovseg_core.backbones import official_weight_file
from ovseg_core.datasets import FAMILY_MODELS
from ovseg_core.methods import get_method
from ovseg_core.vocabulary import parse_vocabulary_string
from storage.images import load_rgb
from storage.store import Store
from storage.tables import read_table

# Tiny random-weight backbones for a first try without any checkpoint (the labels are then meaningless).
TRY_WITHOUT_WEIGHTS = "--clip clip:tiny@random:0 --dino dino:tiny8@random:0 --sam sam:tiny@random:0"


def segment_image(image: str, classes: str, method: str = "corrclip", out: str = "overlay.png", store: str | None = None,
                  clip: str | None = None, dino: str | None = None, sam: str | None = None,
                  regions: str = "sam", progress: bool = True, orchestrate: bool | None = None,
                  weights_dir: str | None = None) -> dict[str, Any]:
    """Segment one image with a custom vocabulary.

    ``orchestrate``: run as a Prefect flow run (None: only when a Prefect API is configured).
    ``weights_dir``: folder of the official checkpoints (None: ``$OVSEG_WEIGHTS``); a missing
    file raises ``FileNotFoundError`` naming every missing file, the flag and a random-weight trial.
    Returns the written paths (``labels``, ``overlay``), the class names, ``random_weights``,
    ``seconds`` (this call's wall time) and ``stage_seconds`` (the part spent running the
    stages: model loading and compute); the difference is ovseg's own overhead.
    """
    t0 = time.perf_counter()
    path = Path(image).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    vocab = parse_vocabulary_string(classes)
    lines = [", ".join(syn) for syn in vocab.classes]
    defaults = FAMILY_MODELS[get_method(method).family]
    exp = parse_experiment({
        "name": "segment",
        "store": store,
        "datasets": [{"name": "segment", "layout": "folder", "root": str(path), "classes": lines}],
        "models": {"clip": clip or defaults.clip, "dino": dino or defaults.dino, "weights_dir": weights_dir,
                   **({"sam2": sam} if regions == "sam2" and sam else {"sam": sam or defaults.sam})},
        "regions": {"source": regions},
        "methods": [{"name": method, "method": method}],
    }, source="ovseg segment")
    _check_weights(exp, weights_dir)
    if orchestrate is None:
        orchestrate = prefect_configured()
    summary = run_experiment(exp, progress=progress, orchestrate=orchestrate)
    node = build_plan(exp)[0].methods[0].prediction
    st = Store(exp.store)
    (row,) = read_table(st, "manifests", ["segment"]).to_pylist()
    if not st.is_complete(node.stage, node.key, row["image_id"]):
        failures = [f for s in summary.stages for f in s.failures]
        detail = "; ".join(f"{s}: {e}" for _, s, e in failures[:3]) or row["error"] or "no output"
        raise RuntimeError(f"segmentation of {path} failed: {detail}")
    labels = st.read_item(node.stage, node.key, row["image_id"], ["labels"])["labels"]
    out_path = Path(out).expanduser().resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    label_path = out_path.with_name(out_path.stem + "_labels.png")
    Image.fromarray(labels.astype(np.uint16 if labels.max() > 255 else np.uint8)).save(label_path)
    rgb = load_rgb(path)
    render_overlay_figure(rgb, labels, list(vocab.class_names), out_path,
                          title=f"{method}: {path.name}", random_weights=summary.random_weights)
    return {"labels": str(label_path), "overlay": str(out_path), "classes": list(vocab.class_names),
            "random_weights": summary.random_weights, "seconds": time.perf_counter() - t0,
            "stage_seconds": sum(s.ended - s.started for s in summary.stages if s.started)}



def _check_weights(exp: Any, weights_dir: str | None) -> None:
    """Raise ``FileNotFoundError`` listing every missing checkpoint, with the flags of ``ovseg segment`` that fix it."""
    missing: list[str] = []
    build_plan(exp, missing)
    if not missing:
        return
    files = []
    for entry in dict.fromkeys(missing):
        name = entry.split(": ", 1)[0].removeprefix("weights of ")
        try:
            file, url = official_weight_file(name)
            files.append(f"{file} ({name}, {url})")
        except ValueError:  # a local checkpoint path: its own message says which
            files.append(entry)
    folder = weights_dir or os.environ.get("OVSEG_WEIGHTS")
    where = f"in {folder}" if folder else "(no weights folder: --weights-dir and OVSEG_WEIGHTS unset)"
    raise FileNotFoundError(
        f"pretrained weights missing {where}: {'; '.join(files)}. Put these files in a folder under these names and "
        "pass --weights-dir DIR (or set OVSEG_WEIGHTS=DIR); `ovseg backbones` lists every file. To try segment "
        f"without weights: {TRY_WITHOUT_WEIGHTS} (random weights: the labels are meaningless)")
