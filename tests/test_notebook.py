"""demo.ipynb runs top to bottom (nbclient, a real kernel) as a user gets it: the package built
into a wheel, installed into a fresh virtual environment, the notebook run from an empty folder,
offline on the toy model. Online, its set-up cells download the default checkpoint — from a local
server standing in for Zenodo."""
import functools
import http.server
import os
import shutil
import site
import subprocess
import sys
import threading
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from mdetr_agf import hub
from mdetr_agf.demo import DEFAULT_MODEL
from mdetr_agf.project import COLAB, PIP_SOURCE

from conftest import write_zenodo_checkpoint

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "demo.ipynb"

# Runs inside the fresh environment: executes the notebook with that environment's kernel and
# appends a cell that reports where mdetr_agf was imported from.
RUNNER = """
import json, sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
nb.cells.append(nbformat.v4.new_code_cell("import mdetr_agf, sys; print('IMPORTED-FROM', mdetr_agf.__file__, sys.executable)"))
NotebookClient(nb, timeout=1200, kernel_name="python3").execute()
nbformat.write(nb, sys.argv[2])
"""


def images(nb):
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs)


def printed(nb):
    return "".join(out.get("text", "") for c in nb.cells if c.cell_type == "code" for out in c.outputs)


def test_committed_notebook_has_no_outputs_and_points_home():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    assert f"({COLAB})" in nb.cells[0].source
    first = nb.cells[1].source
    assert f'"{PIP_SOURCE}"' in first and "RUN_PHRASECUT_GQA = False" in first  # optional downloads off


def build_wheel(tmp_path):
    """A wheel of the checkout's files, built outside the checkout (no build/ left in it)."""
    source = tmp_path / "source"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode == 0 and listed.stdout:
        for name in listed.stdout.decode().split("\0"):
            if name and (REPO / name).is_file():
                (source / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, source / name)
    else:  # not a git checkout: copy the tree, minus what builds and tests leave
        shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True)
    (wheel,) = (tmp_path / "dist").glob("mdetr_agf-*.whl")
    return wheel


def fresh_environment(tmp_path, wheel):
    """A venv that sees this interpreter's packages (torch is not reinstalled) but gets
    mdetr_agf only from the wheel."""
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)], check=True)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    own = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip())
    # When this interpreter is itself a venv, its packages are not the "system" ones: list them.
    (own / "parent_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    return python, own


def test_offline_notebook_runs_from_a_wheel_in_an_empty_folder(tmp_path):
    wheel = build_wheel(tmp_path)
    python, own = fresh_environment(tmp_path, wheel)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MDETR_AGF_MIRROR")}
    env.update(MDETR_AGF_OFFLINE="1", MDETR_AGF_CACHE=str(tmp_path / "cache"),
               MPLBACKEND="module://matplotlib_inline.backend_inline")
    (tmp_path / "runner.py").write_text(RUNNER)
    shutil.copy(NOTEBOOK, tmp_path / "demo.ipynb")
    done = subprocess.run([python, str(tmp_path / "runner.py"), str(tmp_path / "demo.ipynb"),
                           str(tmp_path / "executed.ipynb")], cwd=empty, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    nb = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = printed(nb)
    where = next(line for line in text.splitlines() if line.startswith("IMPORTED-FROM"))
    assert str(own) in where and str(REPO) not in where, where  # the wheel's copy, not the checkout
    assert "loaded toy" in text and "skipped PhraseCut and GQA (offline)" in text
    assert ", not query " in text  # the contrast cell explained one box against another
    assert images(nb) >= 5, f"only {images(nb)} pictures"


def test_online_setup_downloads_the_default_checkpoint(tmp_path, monkeypatch, cache):
    entry = hub.get_entry(DEFAULT_MODEL)
    served = tmp_path / "zenodo"
    served.mkdir()
    write_zenodo_checkpoint(entry.architecture, served / entry.file)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MDETR_AGF_OFFLINE", "0")
    monkeypatch.setenv("MDETR_AGF_MIRROR", f"http://127.0.0.1:{server.server_port}/")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        nb.cells = [c for c in nb.cells if "setup" in c.metadata.get("tags", [])]
        assert len(nb.cells) >= 3
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        server.shutdown()
    text = printed(nb)
    assert f"loaded {DEFAULT_MODEL}" in text
    assert (cache / entry.file).stat().st_size == (served / entry.file).stat().st_size
