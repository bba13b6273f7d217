"""Shared fixtures: tiny models of every family, their processors and ready-made inputs."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from vtoken.compat import forget_last_prompt
from vtoken.testing import random_image, sample_inputs
from vtoken.tiny import TINY_FAMILIES, build_tiny

# The mini third-party plugin package (with its dist-info entry points) becomes importable and
# discoverable exactly as an installed package would be.
sys.path.insert(0, str(Path(__file__).parent / "mini_plugin"))


# the deterministic images and processor inputs every test builds on
image, make_inputs = random_image, sample_inputs

CUDA = "cuda"  # with fake_mode, tensors made on this device are fake CUDA tensors


@pytest.fixture
def fake_mode():
    """The test body runs with fake tensors (``FakeTensorMode``): ``device=CUDA`` makes fake CUDA
    ones, so device placement is checked on a CPU-only machine (device-test modules use it for every
    test: ``pytestmark = pytest.mark.usefixtures("fake_mode")``)."""
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        yield mode


def on_cuda(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == CUDA for t in tensors)


@functools.cache
def _tiny(family: str, attn: str) -> tuple:
    return build_tiny(family, attn_implementation=attn)


def tiny(family: str, attn: str = "sdpa"):
    """A cached tiny model and processor (tests must leave them as they found them; the state a
    model keeps from its last prompt is cleared here)."""
    model, processor = _tiny(family, attn)
    forget_last_prompt(model)
    return model, processor


@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    return request.param


# Tiny models run fastest on one thread, and tests then leave the other core to other work.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def app():
    """The demo module, imported from its file as ``vtoken demo`` does (needs the demo extra)."""
    from vtoken.cli import load_demo_app

    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return load_demo_app()


@pytest.fixture(scope="module")
def demo_url(app, tmp_path_factory):
    """The demo launched on a free local port with a tiny random-weight LLaVA, token_pruning and zipvl."""
    samples = tmp_path_factory.mktemp("samples")
    demo = app.build_demo("tiny:llava", samples=samples, plugins=("token_pruning", "zipvl"))
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield url
    demo.close()


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray head started as its own cluster (the ``--ray-address`` path), stopped after the
    session; its workers run this interpreter, so they import the transformers under test."""
    pytest.importorskip("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}", "--num-cpus=2"]
    # --block: the head lives as long as this process, and terminating it stops only this cluster
    head = subprocess.Popen([*start, "--include-dashboard=false", "--block"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not _listening(port):
        if head.poll() is not None or time.monotonic() > deadline:
            head.kill()
            pytest.fail(f"the local Ray head did not start (exit code {head.poll()})")
        time.sleep(0.5)
    yield f"127.0.0.1:{port}"
    import ray

    ray.shutdown()
    head.terminate()
    head.wait(timeout=120)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
