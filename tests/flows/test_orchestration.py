"""The flow run's final state and names, from run summaries built by hand."""

from __future__ import annotations

import pytest

from flows.orchestration import failed_images, failed_vocabularies, final_state, run_tags, slug
from flows.summary import RunSummary, StageReport
from tests.flows.conftest import tiny_experiment


def _summary(images: int, failures: list[tuple[str, str, str]], busy: int = 0) -> RunSummary:
    """A run over one dataset of ``images`` images; ``failures`` are (stage, image, kind)."""
    s = RunSummary("20260101T000000Z-abcdef", "exp", "/store", images={"voc": images})
    by_stage: dict[str, StageReport] = {}
    for stage, iid, kind in failures:
        rep = by_stage.setdefault(stage, StageReport("voc", stage, "k" + stage, total=images, done=images - 1))
        rep.failures.append((iid, kind, "boom"))
        if kind == "SkippedUpstream":
            rep.skipped += 1
        else:
            rep.failed += 1
    s.stages = list(by_stage.values()) or [StageReport("voc", "scoring", "k", total=images, done=images, busy=busy)]
    if busy and by_stage:
        s.stages[0].busy = busy
    return s


def test_complete_and_incomplete_runs_are_completed():
    done = final_state(_summary(20, []))
    assert (done.type.value, done.name) == ("COMPLETED", "Completed")
    left = final_state(_summary(20, [], busy=2))
    assert (left.type.value, left.name) == ("COMPLETED", "Incomplete")
    assert "2 item(s) left for a later run" in left.message


def test_a_failed_image_counts_once_across_stages():
    # img1 fails in clip_layers, then is skipped downstream: one failed image of 20 (5 %)
    s = _summary(20, [("clip_layers", "img1", "RuntimeError"), ("reconstruction", "img1", "SkippedUpstream")])
    assert failed_images(s) == {("voc", "img1")}
    state = final_state(s, max_failed=0.1)
    assert (state.type.value, state.name) == ("COMPLETED", "Partial")
    assert state.message.startswith("1 of 20 image(s) failed (5.0 %)")
    assert "ovseg-failures-exp" in state.message and "ovseg runs --failures 20260101T000000Z-abcdef" in state.message


def test_more_failures_than_max_failed_is_failed():
    s = _summary(20, [("ingest", f"img{i}", "ImageError") for i in range(3)])  # 15 %
    assert final_state(s, max_failed=0.1).type.value == "FAILED"
    assert final_state(s, max_failed=0.15).name == "Partial"  # exactly at the threshold stays Partial
    assert final_state(s, max_failed=0.0).type.value == "FAILED"
    with pytest.raises(ValueError, match=r"max_failed must be a fraction in \[0, 1\], got 1.5"):
        final_state(s, max_failed=1.5)


def test_busy_items_are_not_failures():
    s = _summary(20, [("clip_layers", "img1", "RuntimeError"), ("clip_layers", "img2", "Busy")])
    assert failed_images(s) == {("voc", "img1")}


def test_artifact_keys_and_tags():
    assert slug("VOC21 CorrCLIP_ablation (tau=3)") == "voc21-corrclip-ablation-tau-3"
    assert slug("***") == "run"
    exp = tiny_experiment("/tmp/unused-store")
    assert run_tags(exp) == ["ovseg", "experiment:tiny", "dataset:voc", "method:corrclip", "method:scclip"]


def test_the_vocabulary_item_is_not_counted_as_an_image():
    # an unreadable CLIP checkpoint: the vocabulary item fails, then each of the 8 images is skipped downstream
    failures = [("text_embeddings", "vocab", "BackboneLoadError")]
    failures += [("reconstruction", f"img{i}", "SkippedUpstream") for i in range(8)]
    s = _summary(8, failures)
    assert failed_images(s) == {("voc", f"img{i}") for i in range(8)}
    assert failed_vocabularies(s) == {"voc"}
    state = final_state(s, max_failed=1.0)  # even a run that tolerates every image failing has nothing to score
    assert state.type.value == "FAILED" and "8 of 8 image(s) failed (100.0 %)" in state.message
    assert state.message.startswith("the vocabulary of voc failed")
    # one image failed, and the vocabulary of the dataset too: 1 of 20, not 2 of 20
    s = _summary(20, [("text_embeddings", "vocab", "RuntimeError"), ("clip_layers", "img1", "RuntimeError")])
    assert failed_images(s) == {("voc", "img1")} and "1 of 20 image(s) failed (5.0 %)" in final_state(s).message
