"""The shipped demo family: installed inside the package, small, loads as each kind, and draws what the
prompt says (checked by the evaluator, not by stored pixels)."""

import pytest

import editsuite
from editsuite import ModelKind, load_bundle
from editsuite.demo import demo_model
from editsuite.demo.evaluate import analyse


def test_family_is_installed_and_at_most_30_mb():
    folders = [demo_model(k) for k in ModelKind]
    assert all(folders), "the demo family is missing from editsuite/demo"
    size = sum(p.stat().st_size for f in folders for p in f.rglob("*") if p.is_file())
    assert size <= 30_000_000, size  # 30 MB, as the issue counts


@pytest.mark.parametrize("kind", list(ModelKind))
def test_each_member_loads_as_its_kind(kind):
    b = load_bundle(demo_model(kind), device="cpu")
    assert b.kind is kind and (b.manifest.native_resolution == 64 or kind is ModelKind.UPSCALER)


def test_txt2img_draws_the_prompt():
    task = editsuite.Txt2Img(load_bundle(demo_model(ModelKind.BASE), device="cpu"))
    found = [analyse(task.run("a red circle on a blue background", steps=20, seed=s).images[0]) for s in range(4)]
    assert sum(a.background == "blue" for a in found) >= 3, found
    assert sum(any(f.colour == "red" for f in a.objects) for a in found) >= 3, found


def test_cli_uses_the_demo_by_default(tmp_path, monkeypatch, capsys):
    from editsuite.cli.app import main

    monkeypatch.chdir(tmp_path)
    assert main(["txt2img", "-p", "a red circle on a blue background", "-o", "out.png", "--steps", "4"]) == 0
    assert "built-in demo model" in capsys.readouterr().err
    assert (tmp_path / "out.png").exists()
