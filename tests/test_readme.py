"""The README's API example runs as written, and the README's links point at files that exist."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_the_api_example_runs_as_written():
    section = README[README.index("## API"):]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:1]
    namespace: dict = {}
    exec(compile(code, "README.md (API)", "exec"), namespace)  # noqa: S102 - the documented example itself
    assert tuple(namespace["feats"].shape) == (1, 14, 14, 512)
    assert tuple(namespace["labels"].shape) == (1, 224, 224) and int(namespace["labels"].max()) <= 2


@pytest.mark.parametrize("target", sorted(set(re.findall(r"\]\(((?:docs|configs)/[^)#]*)", README))))
def test_readme_links_exist(target):
    assert (REPO / target).exists(), target
