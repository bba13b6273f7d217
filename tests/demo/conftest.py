"""The demo app, launched once per test module on a free local port (tiny random-weight LLaVA)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")

APP = Path(__file__).resolve().parents[2] / "demos" / "gradio_app.py"


def load_app():
    """The demo module, imported from its file as ``vtoken demo`` does."""
    spec = importlib.util.spec_from_file_location("vtoken_demo_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app():
    return load_app()


@pytest.fixture(scope="module")
def demo_url(app, tmp_path_factory):
    samples = tmp_path_factory.mktemp("samples")
    demo = app.build_demo("tiny:llava", samples=samples, plugins=("token_pruning",))
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield url
    demo.close()
