"""What the README tells a newcomer is true: its offline snippet runs as written, and its facts
(the toy's words, the slim copies' sizes, the environment variables, the Python version) match the code.
User docs speak of the project only."""
import ast
import json
import math
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from PIL import Image

from mdetr_agf.shapesworld import vocabulary

from conftest import conformance_path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def code_blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def between(marker):
    return README.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0].strip()


def test_the_offline_snippet_runs_as_written(tmp_path):
    snippet = code_blocks("python")[0]
    assert 'load_model("toy")' in snippet, "the first Python block is the offline one"
    saved = re.findall(r'save="([^"]+)"', snippet)
    assert saved, "the snippet ends with a figure"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "MDETR_AGF_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "MDETR_AGF_CACHE": str(tmp_path / "cache"),
           "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    printed_caption = re.search(r"print\(scene\.caption\)\s+#\s*(.+)", snippet).group(1).strip()
    lines = result.stdout.splitlines()
    assert lines[0] == printed_caption, "the comment shows what the snippet prints"
    assert len(lines) >= 2 and all("score" in line and "box" in line for line in lines[1:])
    figure = Image.open(tmp_path / saved[0])
    assert figure.format == "PNG" and min(figure.size) > 300
    colours = figure.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 1000, "a picture, not a blank canvas"


def test_every_python_block_is_valid_python():
    blocks = code_blocks("python")
    assert len(blocks) >= 2
    for block in blocks:
        ast.parse(block)


def test_the_test_command_is_the_one_ci_runs():
    command = 'pip install -e ".[test]" && python -m pytest'
    assert command in README
    assert command in (REPO / ".ci" / "run").read_text()


def test_the_toy_words_are_the_toys_vocabulary():
    assert [w.strip() for w in between("toy-vocabulary").split(",")] == vocabulary()
    assert f"exactly these {len(vocabulary())} words" in README


def test_slim_copy_sizes_are_the_layouts_weights():
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in between("footprint").splitlines()]
    header, body = rows[0], [r for r in rows[2:] if r and r[0]]
    slim = header.index("slim copy")
    layouts = {r[0].strip("`"): r for r in body}
    assert len(layouts) == 8
    for layout, row in layouts.items():
        manifest = json.loads(conformance_path("mdetr", f"{layout}.manifest.json").read_text())
        weights = sum(math.prod(shape) * (8 if dtype.endswith("int64") else 4) for _, shape, dtype in manifest)
        assert row[slim] == f"{weights / 1e9:.2f} GB", (layout, row[slim], weights)


def test_the_environment_variables_are_the_ones_the_code_reads():
    sources = "".join(p.read_text() for folder in ("mdetr_agf", "tests") for p in (REPO / folder).rglob("*.py"))
    named = set(re.findall(r"`(MDETR_AGF_[A-Z_]+)`", README))
    assert named >= {"MDETR_AGF_CACHE", "MDETR_AGF_MIRROR", "MDETR_AGF_OFFLINE", "MDETR_AGF_URL_TIMEOUT"}
    assert all(f'"{name}"' in sources for name in named), named


def test_the_python_version_is_the_packages():
    required = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert required == ">=3.10" and "Python 3.10 or newer" in README


def test_the_teaser_is_the_generated_figure():
    assert "](docs/gallery/teaser.png)" in README and "python scripts/make_figures.py" in README


SESSION_TALK = re.compile(r"\bstop[ -]\d+\b|\bissue \d+\b", re.I)


def test_user_docs_speak_of_the_project_only():
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    found = {str(p.relative_to(REPO)): SESSION_TALK.findall(p.read_text()) for p in docs}
    assert {p: hits for p, hits in found.items() if hits} == {}
    assert SESSION_TALK.search("as measured at stop 13") and SESSION_TALK.search("the bar (issue 6)")
    assert not SESSION_TALK.search("issues #59, #68 of ashkamath/mdetr")
