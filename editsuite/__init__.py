"""editsuite: on-device image editing on Stable Diffusion (txt2img, img2img, inpaint, outpaint, upscale).

    import editsuite
    bundle = editsuite.load_bundle("path/to/model")      # diffusers folder, .safetensors, hub id
    result = editsuite.Inpaint(bundle).run("photo.png", "mask.png", "a wooden bench", seed=1)
    result.images[0].save("out.png")
"""

__version__ = "0.1.0"

from editsuite.bundle.loader import ModelBundle, load_bundle  # noqa: E402
from editsuite.bundle.manifest import Manifest, ModelKind  # noqa: E402
from editsuite.errors import UserError  # noqa: E402
from editsuite.tasks import Img2Img, Inpaint, Outpaint, TaskResult, Txt2Img, Upscale  # noqa: E402

__all__ = [
    "load_bundle", "ModelBundle", "Manifest", "ModelKind", "UserError", "TaskResult",
    "Txt2Img", "Img2Img", "Inpaint", "Outpaint", "Upscale", "__version__",
]
