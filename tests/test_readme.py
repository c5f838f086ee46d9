"""The README's Python example runs as written (random weights: no Hub in tests)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_example_runs(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)  # the example reads cat.jpg and writes its overlay here
    Image.new("RGB", (300, 240), (200, 120, 40)).save("cat.jpg")
    text = README.read_text()
    block = re.search(r"## In Python\n\n```python\n(.*?)```", text, re.S).group(1)
    assert "from_backbone(" in block and "explain(" in block
    offline = block.replace("num_labels=200)", "num_labels=200, pretrained=False)")
    assert offline != block
    scope: dict = {}
    exec(compile(offline, str(README), "exec"), scope)
    assert tuple(scope["heatmaps"].shape) == (2, 224, 224)
    assert set(scope["out"]) == {"loss", "logits", "loss_ce", "loss_cgc"}
    assert Image.open("cat_gradcam.png").size == (224, 224)  # the overlay it writes


def test_first_lines_are_the_two_setup_commands():
    text = README.read_text()
    commands = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    lines = [ln for ln in commands.splitlines() if ln and not ln.startswith("#")]
    assert lines[0].startswith("pip install -e '.[dev,pretrained]' && python recipes/finetune.py")
    assert lines[1] == "HF_HUB_OFFLINE=1 python -m pytest"
    ci = (README.parent / ".ci" / "run").read_text()
    assert "README.md" in ci  # CI runs these two lines from the README itself


def test_reliability_section_names_tests_that_exist():
    text = README.read_text()
    section = text[text.index("## Resuming and troubleshooting") : text.index("## Citation")]
    named = re.findall(r"`(test_\w+)(?:::(test_\w+))?`", section)
    assert len(named) > 20
    for module, test in named:
        source = (README.parent / "tests" / f"{module}.py").read_text()
        assert not test or f"def {test}(" in source, f"{module}::{test}"
