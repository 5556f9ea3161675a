"""A tiny LLaVA (2-layer CLIP vision tower + 2-layer Llama) with a processor, built from config
(no download), and a few generated images of coloured shapes with captions."""

from __future__ import annotations

import json

import pytest

from vision_helpers import build_tiny_vlm, make_shapes  # noqa: F401 - re-exported for the tests


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    return str(build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm")))


@pytest.fixture
def shapes(tmp_path):
    """tmp_path/data/{train.jsonl (LLaVA shape), chat.jsonl (OpenAI shape)} + images/ (paths relative)."""
    return make_shapes(tmp_path / "data")


def read_jsonl(path):
    return [json.loads(x) for x in open(path)]
