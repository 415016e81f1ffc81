"""The five edits. Each task only prepares inputs for the shared loop in `editsuite.core`."""

from editsuite.tasks.base import Task, TaskResult
from editsuite.tasks.img2img import Img2Img
from editsuite.tasks.inpaint import Inpaint
from editsuite.tasks.outpaint import Outpaint
from editsuite.tasks.txt2img import Txt2Img
from editsuite.tasks.upscale import Upscale

TASKS = {t.name: t for t in (Txt2Img, Img2Img, Inpaint, Outpaint, Upscale)}


def describe(tasks: dict | None = None) -> list[dict]:
    """Every edit's machine-readable description (what `editsuite tasks --json` prints): its inputs, the model
    kinds it takes and each parameter's name, type, default, range or choices and help."""
    return [t.describe() for t in (TASKS if tasks is None else tasks).values()]


__all__ = ["Task", "TaskResult", "Txt2Img", "Img2Img", "Inpaint", "Outpaint", "Upscale", "TASKS", "describe"]
