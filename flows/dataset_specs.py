"""What an experiment's dataset entry resolves to: its dataset spec and its class names.

Torch-free (the report reads it without building a plan); ``flows.graph`` builds the stage graph
from it.
"""

from __future__ import annotations

import dataclasses

from flows.config import DatasetEntry
from ovseg_core.datasets import DatasetSpec, get_dataset
from ovseg_core.vocabulary import parse_class_lines

__all__ = ["class_names", "dataset_spec"]


def dataset_spec(ds: DatasetEntry) -> DatasetSpec:
    """The dataset's spec; with a custom vocabulary, the spec's presets (default VOC20's) with its class count."""
    base = get_dataset(ds.spec or "VOC20")
    if not ds.classes:
        return base
    presets = {k: dataclasses.replace(p, prob_thd=p.prob_thd if ds.background else None,
                                      area_thd=p.area_thd if ds.background else None) for k, p in base.presets.items()}
    return DatasetSpec(name=ds.spec or "custom", num_classes=len(ds.classes), has_background=ds.background,
                       reduce_zero_label=False, presets=presets, class_files=dict(base.class_files), label_conversion="none")


def class_names(lines: list[str], separator: str, spec: DatasetSpec, custom: bool) -> tuple[str, ...]:
    """Class names of a vocabulary; a benchmark's background class is named "background"."""
    names = [n.strip() for n in parse_class_lines(lines, separator).class_names]
    if spec.has_background and not custom and names:
        names[0] = "background"
    return tuple(names)
