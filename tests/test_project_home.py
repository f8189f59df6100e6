"""Every place that names the project's home (badge, install line, torch.hub, package metadata, docs)
names the same repository: the one written in ``mdetr_agf/project.py``."""
import re
import tomllib
from pathlib import Path

import pytest

from mdetr_agf import project

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "build", "dist", ".pytest_cache", ".hypothesis", "node_modules"}
TEXT_SUFFIXES = {".md", ".py", ".ipynb", ".toml", ".json", ".txt", ".cfg", ".ini", ".yml", ".yaml", ".rst", ".sh", ""}

GITHUB = re.compile(r"github\.com/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)")
OWNER_NAME = re.compile(r"(?<![\w.-])([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)")
COLAB = re.compile(r"colab\.research\.google\.com/github/[^\s)\"'\]>\\]+")
PIP_GIT = re.compile(r"git\+https?://[^\s)\"'\]>\\]+")
HUB_LOAD = re.compile(r"torch\.hub\.load\(\s*[\"']([^\"']+)[\"']")


def tree_files():
    """Text files of the checkout (what a clean clone holds, plus anything new), virtualenvs and caches left out."""
    for path in sorted(REPO.rglob("*")):
        parts = path.relative_to(REPO).parts
        if any(p in SKIP_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
            continue
        if any((REPO.joinpath(*parts[:i]) / "pyvenv.cfg").is_file() for i in range(1, len(parts))):
            continue
        if path.is_file() and path.suffix in TEXT_SUFFIXES and path.stat().st_size < 2_000_000:
            try:
                yield path, path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue


def looks_like_the_project(owner, name):
    owner, name = owner.lower(), name.lower()
    return (owner in {"ru-cs535-adox", "mdetr-agf", "mdetr_agf"}
            or any(word in name for word in ("interpreting-mdetr", "mdetr-agf", "mdetr_agf")))


def disagreements(text):
    """Every spelling of the project's home in ``text`` that is not the one home."""
    bad = []
    for m in GITHUB.finditer(text):
        owner, name = m.group(1), m.group(2).removesuffix(".").removesuffix(".git")
        if looks_like_the_project(owner, name) and f"{owner}/{name}" != project.REPOSITORY:
            bad.append(m.group(0))
    for m in OWNER_NAME.finditer(text):
        owner, name = m.group(1), m.group(2).removesuffix(".").removesuffix(".git")
        if owner.lower() == "ru-cs535-adox" or "interpreting-mdetr" in name.lower():
            if f"{owner}/{name}" != project.REPOSITORY:
                bad.append(m.group(0))
    for m in COLAB.finditer(text):
        if "https://" + m.group(0) != project.COLAB:
            bad.append(m.group(0))
    for m in PIP_GIT.finditer(text):
        if m.group(0) != project.PIP_SOURCE:
            bad.append(m.group(0))
    for m in HUB_LOAD.finditer(text):
        source = m.group(1)
        if source.count("/") == 1 and not source.startswith((".", "/", "~")) and source != project.REPOSITORY:
            bad.append(m.group(0))
    return bad


def test_every_mention_of_the_home_in_the_tree_is_the_same_one():
    files = dict(tree_files())
    assert REPO / "README.md" in files and REPO / "demo.ipynb" in files and REPO / "hubconf.py" in files
    # project.py builds the spellings from one string; this file holds deliberate strays for the test below
    for source in (REPO / "mdetr_agf" / "project.py", Path(__file__).resolve()):
        del files[source]
    found = {str(p.relative_to(REPO)): disagreements(text) for p, text in files.items()}
    assert {p: bad for p, bad in found.items() if bad} == {}


def test_the_entry_points_name_the_home():
    readme = (REPO / "README.md").read_text()
    notebook = (REPO / "demo.ipynb").read_text()
    hubconf = (REPO / "hubconf.py").read_text()
    assert f"({project.COLAB})" in readme, "the README's Colab badge"
    assert f"({project.COLAB})" in notebook, "the notebook's Colab badge"
    assert project.PIP_SOURCE in notebook, "the notebook's install cell"
    assert f'"{project.REPOSITORY}"' in hubconf, "hubconf's torch.hub.load example"


def test_package_metadata_is_the_constant_the_package_reads():
    urls = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]
    assert urls["Homepage"] == project.HOME
    assert all(url == project.COLAB or url == project.HOME or url.startswith(project.HOME + "/")
               for url in urls.values()), urls
    assert project.HOME == "https://github.com/" + project.REPOSITORY


@pytest.mark.parametrize("text", [
    "[badge](https://colab.research.google.com/github/{other}/blob/main/demo.ipynb)",
    'pip install git+https://github.com/{other}',
    'torch.hub.load("{other}", "toy")',
    "see https://github.com/{other}.",
    "https://github.com/RU-CS535-ADOX/Interpreting-MDETR",
])
def test_a_stray_spelling_is_caught(text):
    other = "mdetr-agf/" + "mdetr-agf"  # the placeholder the tree used to carry, built so no file holds it
    assert disagreements(text.format(other=other))
    assert not disagreements(f"{project.COLAB} {project.PIP_SOURCE} torch.hub.load(\"{project.REPOSITORY}\", "
                             f"'toy') https://github.com/ashkamath/mdetr torch.hub.load('.', 'toy')")
