import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def photo() -> PIL.Image.Image:
    """A 64x64 test picture: smooth gradients and a block, deterministic."""
    y, x = np.mgrid[0:64, 0:64]
    img = np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)
    img[20:40, 24:44] = [200, 40, 40]
    return PIL.Image.fromarray(img)


@pytest.fixture(scope="session")
def mask() -> PIL.Image.Image:
    m = np.zeros((64, 64), np.uint8)
    m[16:44, 20:48] = 255
    return PIL.Image.fromarray(m)


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder on a read-only file system: a real read-only tmpfs where this machine lets us mount one (root,
    as on CI), else the same answers from os.access and os.statvfs for that folder."""
    import os
    import subprocess

    folder = tmp_path / "ro"
    (folder / "existing").mkdir(parents=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder / "existing")], capture_output=True
    ).returncode == 0
    if not mounted:
        real_access, real_statvfs = os.access, os.statvfs
        inside = lambda p: Path(os.path.abspath(p)).is_relative_to(folder)  # noqa: E731
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: (not (mode & os.W_OK)) if inside(p) else
                            real_access(p, mode, **kw))

        class _RO:
            f_flag = os.ST_RDONLY
        monkeypatch.setattr(os, "statvfs", lambda p: _RO() if inside(p) else real_statvfs(p))
    yield folder / "existing"
    if mounted:
        subprocess.run(["umount", str(folder / "existing")], check=True)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A bf16 bundle's thread governor changes torch's process-wide thread count with the machine's load;
    each test starts from torch's own count."""
    import torch

    from editsuite.bundle import speed

    yield
    if torch.get_num_threads() != speed._START_THREADS:
        torch.set_num_threads(speed._START_THREADS)
