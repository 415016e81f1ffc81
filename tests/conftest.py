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
