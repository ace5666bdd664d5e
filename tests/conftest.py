"""Shared fixtures: a user-style model file with weights and data, written to a temp dir."""
from __future__ import annotations

import os
import textwrap

# `make test` runs two pytest-xdist workers on the CI's two cores: one thread each (set before torch
# is imported, and inherited by the CLI subprocesses), or the workers' thread pools fight over them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

MYNET = textwrap.dedent('''
    import torch
    from torch import nn

    class MyNet(nn.Module):
        def __init__(self, classes=4):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(32, classes)

        def forward(self, x):
            return self.head(self.body(x))

    def build():
        return MyNet()

    def broken():
        raise RuntimeError("factory exploded on purpose")

    def calib_data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(40, 3, 16, 16, generator=g).numpy()
''')


@pytest.fixture
def one_torch_thread():
    """torch at one thread for a test: two threads on the loaded 2-core test machine ran
    fine-tuning 50x slower than one. Used as `pytestmark = pytest.mark.usefixtures(...)`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _private_stage_cache(tmp_path_factory):
    """Tests never read or fill the user's own stage cache (~/.cache/edgepack)."""
    import os
    old = os.environ.get("EDGEPACK_CACHE_DIR")
    os.environ["EDGEPACK_CACHE_DIR"] = str(tmp_path_factory.mktemp("stage-cache"))
    yield
    if old is None:
        os.environ.pop("EDGEPACK_CACHE_DIR", None)
    else:
        os.environ["EDGEPACK_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def user_model(tmp_path_factory) -> dict:
    """mynet.py:build + mynet.safetensors + calib.npz/val.npz, input 1x3x16x16, 4 classes."""
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("usermodel")
    (root / "mynet.py").write_text(MYNET)
    ns: dict = {}
    exec(MYNET, ns)
    torch.manual_seed(0)
    model = ns["build"]().eval()
    save_file(model.state_dict(), str(root / "mynet.safetensors"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()  # labels the float model gets right
    np.savez(root / "calib.npz", x=x[:64])
    np.savez(root / "val.npz", x=x[64:], y=y[64:])
    return {"root": root, "model": f"{root / 'mynet.py'}:build", "weights": str(root / "mynet.safetensors"),
            "calib": str(root / "calib.npz"), "eval": str(root / "val.npz"), "module": model,
            "shape": "1x3x16x16"}


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run the edgepack CLI in-process; returns (exit code, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout
    from edgepack import cli
    o, e = io.StringIO(), io.StringIO()
    cli.console.file, cli.out.file = e, o
    try:
        with redirect_stdout(o), redirect_stderr(e):
            code = cli.main(list(args))
    finally:
        cli.console.file = cli.out.file = None
    return code, o.getvalue(), e.getvalue()
