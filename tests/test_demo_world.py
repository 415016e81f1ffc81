"""The demo world: captions follow the grammar, renders are exact, the evaluator reads renders back."""

import numpy as np
import pytest

from editsuite.demo.evaluate import analyse, classify_shape, score
from editsuite.demo.scenes import Obj, Scene, parse, render, sample_scene
from editsuite.demo.data import heldout_prompts


def test_plain_and_rich_captions():
    plain = Scene("blue", (Obj("red", "circle", "large", "centre"),))
    assert plain.caption() == "a red circle on a blue background"
    rich = Scene("blue", (Obj("red", "circle", "small", "left", say_size=True, say_place=True),
                          Obj("green", "square", "large", "right")))
    assert rich.caption() == "a small red circle at the left and a green square, on a blue background"
    assert Scene("orange", (Obj("orange", "square", "small", "top", say_size=False),)).caption().endswith(
        "on an orange background")


@pytest.mark.parametrize("res", [64, 128])
def test_evaluator_reads_exact_renders(res):
    rng = np.random.default_rng(res)
    for _ in range(150):
        scene = sample_scene(rng)
        got = score(analyse(render(scene, res)), parse(scene.caption()))
        assert got == {"background": 1.0, "colour": 1.0, "shape": 1.0}, scene.caption()


def test_parse_recovers_the_scene():
    rng = np.random.default_rng(3)
    for _ in range(100):
        scene = sample_scene(rng)
        spec = parse(scene.caption())
        assert spec["background"] == scene.background
        assert [(o["colour"], o["shape"]) for o in spec["objects"]] == [(o.colour, o.shape) for o in scene.objects]
        for o, s in zip(scene.objects, spec["objects"]):
            assert s["size"] == (o.size if o.say_size else None)


def test_shape_classifier_tells_the_three_apart():
    from editsuite.demo.evaluate import _ideal

    for shape in ("circle", "square", "triangle"):
        assert classify_shape(_ideal(shape, 20, 20))[0] == shape


def test_evaluator_sees_a_wrong_picture():
    scene = Scene("blue", (Obj("red", "circle", "large", "centre"),))
    wrong = Scene("green", (Obj("yellow", "triangle", "large", "centre"),))
    assert score(analyse(render(wrong, 64)), parse(scene.caption())) == {"background": 0.0, "colour": 0.0,
                                                                          "shape": 0.0}


def test_heldout_prompts_are_fixed_and_distinct():
    a, b = heldout_prompts(), heldout_prompts()
    assert a == b and len(set(a)) == 200
    assert all(parse(p)["objects"] for p in a)
