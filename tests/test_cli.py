"""The command line as a user meets it: each case runs the real CLI (``python -m mdetr_agf``) in its own
process, offline, with its own cache."""
import argparse
import functools
import http.server
import os
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

from mdetr_agf import cli, hub
from mdetr_agf.shapesworld import make_scene

REPO = Path(__file__).resolve().parents[1]
# The checkout's package, whatever folder a command runs in (installed or not).
PYTHONPATH = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def run_cli(*args, env=None, tmp_path=None, timeout=300):
    environ = {**os.environ, "PYTHONPATH": PYTHONPATH, "COLUMNS": "200", "MDETR_AGF_OFFLINE": "1", "MPLBACKEND": "Agg", **(env or {})}
    if tmp_path is not None:
        environ.setdefault("MDETR_AGF_CACHE", str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "mdetr_agf", *args], capture_output=True, text=True,
                          env=environ, cwd=tmp_path or REPO, timeout=timeout)


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    scene = make_scene(1_000_003)
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    scene.image.save(path)
    return path, scene.caption


@pytest.mark.parametrize("argv", [["demo", "--model", "no_such_model"],
                                  ["detect", "x.png", "a red circle", "--model", "no_such_model"]])
def test_an_unknown_model_fails_listing_the_names(argv, tmp_path):
    result = run_cli(*argv, tmp_path=tmp_path)
    assert result.returncode == 2
    [line] = error_lines(result)
    assert "no_such_model" in line and all(name in line for name in hub.registry())


def test_offline_demo_says_it_falls_back_to_the_toy(tmp_path):
    result = run_cli("demo", "--model", "mdetr_resnet101", "--out", "demo.png", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "toy" in result.stderr and "mdetr_resnet101" in result.stderr and "MDETR_AGF_OFFLINE" in result.stderr
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir()), "nothing downloaded"


def test_the_toy_demo_says_nothing_about_falling_back(tmp_path):
    result = run_cli("demo", "--out", "demo.png", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "instead of" not in result.stderr and (tmp_path / "demo.png").is_file()


@pytest.fixture
def empty_mirror(tmp_path):
    """A real HTTP server on 127.0.0.1 standing in for Zenodo, holding no files (every download is a 404)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


@pytest.mark.parametrize("command", ["demo", "detect"])
def test_a_failed_download_suggests_the_toy(command, tmp_path, empty_mirror, scene_png):
    image, caption = scene_png
    argv = ["demo", "--model", "mdetr_clevr"] if command == "demo" else ["detect", str(image), caption,
                                                                          "--model", "mdetr_clevr"]
    result = run_cli(*argv, env={"MDETR_AGF_OFFLINE": "0", "MDETR_AGF_MIRROR": empty_mirror}, tmp_path=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "mdetr-agf: error:" in result.stderr and "--model toy" in result.stderr


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "gpu"])
def test_an_unusable_device_is_a_one_line_error(device, tmp_path, scene_png):
    image, caption = scene_png
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so the case is the same on every machine
    result = run_cli("detect", str(image), caption, "--model", "toy", "--device", device,
                     env={"CUDA_VISIBLE_DEVICES": ""}, tmp_path=tmp_path)
    assert result.returncode == 2
    [line] = error_lines(result)
    assert line.startswith("mdetr-agf: error: device ") and repr(device) in line and "'cpu'" in line


def subcommands():
    parser = cli.parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": parser, **sub.choices}


@pytest.mark.parametrize("name", list(subcommands()))
def test_help_shows_every_default(name):
    parser = subcommands()[name]
    result = run_cli(*([name] if name else []), "--help")
    assert result.returncode == 0
    # the options section: one block per option, starting at a line "  -x / --xyz"
    text = result.stdout.split("options:", 1)[1]
    blocks, current = {}, None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            current = stripped.split()[0].rstrip(",")
            blocks[current] = stripped
        elif current and line.startswith("   "):
            blocks[current] += " " + stripped
        else:
            current = None
    for action in parser._actions:
        if not action.option_strings or action.default == argparse.SUPPRESS:
            continue
        block = blocks[action.option_strings[0]]
        assert "(default: " in block, f"{name} {action.option_strings[0]}: {block}"
        if action.default is not None:
            assert f"(default: {action.default})" in block, block


def test_version_is_the_package_version():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"mdetr-agf {version}"


def test_a_closed_pipe_is_not_an_error(tmp_path):
    """As `mdetr-agf models | head -0`: the reader has gone before the first line is written."""
    environ = {**os.environ, "MDETR_AGF_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "mdetr_agf", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=environ, cwd=REPO)
    proc.stdout.close()  # before the interpreter has started: every write meets a pipe without a reader
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and stderr == ""


def test_a_shell_pipe_into_head_is_quiet(tmp_path):
    result = subprocess.run(f'"{sys.executable}" -m mdetr_agf models | head -n 1', shell=True, capture_output=True,
                            text=True, cwd=REPO, env={**os.environ, "MDETR_AGF_CACHE": str(tmp_path / "cache")})
    assert result.stdout.split() [:2] == ["name", "architecture"] and result.stderr == ""


def test_the_toy_warns_about_words_it_does_not_know(tmp_path, scene_png):
    image, _ = scene_png
    result = run_cli("detect", str(image), "the red dog left of a sofa", "--model", "toy", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    [warning] = [line for line in error_lines(result) if "warning" in line]
    assert "'dog', 'sofa' are not among them" in warning
    assert "'red'" not in warning and "'left'" not in warning


def test_a_shapesworld_caption_gets_no_warning(tmp_path, scene_png):
    image, caption = scene_png
    result = run_cli("detect", str(image), caption, "--model", "toy", tmp_path=tmp_path)
    assert result.returncode == 0 and "warning" not in result.stderr
    assert "query" in result.stdout  # it detected something and said so


def test_parsing_and_listing_import_no_torch(tmp_path):
    """`--help`, `--version` and `models` must not pay for torch, timm or transformers, nor for
    the download stack (requests, urllib3, tqdm): listing reads a JSON file and the cache folder."""
    code = ("import sys\n"
            "from mdetr_agf.cli import main, parser\n"
            "for name in ('models', 'download', 'detect', 'explain', 'evaluate', 'demo'):\n"
            "    try: parser().parse_args([name, '--help'])\n"
            "    except SystemExit: pass\n"
            "assert main(['models']) == 0\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'transformers', 'torchvision',"
            " 'matplotlib', 'numpy', 'requests', 'urllib3', 'tqdm'})\n"
            "print('HEAVY', heavy, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "MDETR_AGF_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stderr


def test_the_cli_method_names_are_the_explainers():
    from mdetr_agf.attribution import METHODS

    assert list(cli.METHOD_NAMES) == list(METHODS)
    from mdetr_agf.attribution.mdetr.targets import SCORES

    assert list(cli.SCORE_NAMES) == list(SCORES)


def test_explain_versus_a_query_or_a_phrase_draws_the_contrast(tmp_path):
    scene = make_scene(1_000_100, confusable=True)  # "a small circle" next to a large one
    image = tmp_path / "twins.png"
    scene.image.save(image)
    phrase = scene.phrases[0].text
    by_query = run_cli("explain", str(image), scene.caption, "--phrase", phrase, "--versus", "6", "--model", "toy",
                       "--out", "contrast.png", tmp_path=tmp_path)
    assert by_query.returncode == 0, by_query.stderr
    assert "not query 6" in by_query.stdout and (tmp_path / "contrast.png").stat().st_size > 10_000
    by_phrase = run_cli("explain", str(image), scene.caption, "--phrase", phrase, "--versus", "circle",
                        "--model", "toy", "--out", "words.png", tmp_path=tmp_path)
    assert by_phrase.returncode == 0, by_phrase.stderr
    assert "not query 2, tokens [3]" in by_phrase.stdout
    wrong = run_cli("explain", str(image), scene.caption, "--phrase", phrase, "--versus", "a blue dog",
                    "--model", "toy", tmp_path=tmp_path)
    assert wrong.returncode == 2
    [line] = [line for line in error_lines(wrong) if "error" in line]
    assert "phrase 'a blue dog' does not occur in caption" in line


def test_explain_takes_the_score_to_explain(scene_png, tmp_path):
    path, caption = scene_png
    chosen = run_cli("explain", str(path), caption, "--model", "toy", "--score", "softmax", "--out", "s.png",
                     tmp_path=tmp_path)
    assert chosen.returncode == 0, chosen.stderr
    assert "(score: softmax)" in chosen.stdout.splitlines()[0]
    default = run_cli("explain", str(path), caption, "--model", "toy", "--method", "gae", "--out", "g.png",
                      tmp_path=tmp_path)
    assert default.returncode == 0 and "(score: logit)" in default.stdout  # GAE's own: the logit
    refused = run_cli("explain", str(path), caption, "--model", "toy", "--method", "rollout", "--score", "logit",
                      tmp_path=tmp_path)
    assert refused.returncode == 2 and "reads attention only" in refused.stderr
