"""demo.ipynb runs top to bottom (nbclient, a real kernel): offline on the toy model, and online
its set-up cells download the default checkpoint — from a local server standing in for Zenodo."""
import functools
import http.server
import threading
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from mdetr_agf import hub
from mdetr_agf.demo import DEFAULT_MODEL

from conftest import write_zenodo_checkpoint

NOTEBOOK = Path(__file__).resolve().parents[1] / "demo.ipynb"


def run(nb, tmp_path):
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def images(nb):
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs)


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    assert "colab.research.google.com/github" in nb.cells[0].source


def test_offline_notebook_runs_and_draws(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("MDETR_AGF_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = run(nbformat.read(NOTEBOOK, as_version=4), tmp_path)
    assert images(nb) >= 4, f"only {images(nb)} pictures"
    text = "".join(out.get("text", "") for c in nb.cells if c.cell_type == "code" for out in c.outputs)
    assert "loaded toy" in text


def test_online_setup_downloads_the_default_checkpoint(tmp_path, monkeypatch, cache):
    entry = hub.get_entry(DEFAULT_MODEL)
    served = tmp_path / "zenodo"
    served.mkdir()
    write_zenodo_checkpoint(entry["architecture"], served / entry["file"])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MDETR_AGF_OFFLINE", "0")
    monkeypatch.setenv("MDETR_AGF_MIRROR", f"http://127.0.0.1:{server.server_port}/")
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        nb.cells = [c for c in nb.cells if "setup" in c.metadata.get("tags", [])]
        assert len(nb.cells) >= 3
        run(nb, tmp_path)
    finally:
        server.shutdown()
    text = "".join(out.get("text", "") for c in nb.cells if c.cell_type == "code" for out in c.outputs)
    assert f"loaded {DEFAULT_MODEL}" in text
    assert (cache / entry["file"]).stat().st_size == (served / entry["file"]).stat().st_size
