"""Shared, frozen, half-precision models and the last raw exceptions.

A model shared by threads gives every caller the maps it would get alone; a frozen model, a
call inside ``torch.inference_mode()`` and a float16 / bfloat16 model explain like the float32
model they come from, and the model comes back with every flag and weight as it was; every
input the package cannot use gets a typed error saying what is allowed. All on the bundled toy
model (real weights, offline), with real threads, real HTTP servers on 127.0.0.1 and the real
CLI in a subprocess.
"""
import copy
import http.server
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mdetr_agf
from mdetr_agf.errors import DownloadError, InputError, InputTypeError, MdetrAgfError, ModelBusyError
from mdetr_agf.attribution import QueryTokenTarget
from mdetr_agf.images import prepare
from mdetr_agf.shapesworld import make_scene

REPO = Path(__file__).resolve().parents[1]
GRADIENT_METHODS = ("agf", "gae", "gradcam", "grad_x_input")


@pytest.fixture(scope="module")
def scenes():
    return make_scene(1_000_001), make_scene(1_000_002)


@pytest.fixture(scope="module")
def own_toy():
    """A toy model of this module's own, so a failing test cannot leave the shared one changed."""
    return mdetr_agf.load_model("toy")


def maps_of(expl):
    return expl.image, expl.tokens, expl.grid


def assert_same_maps(a, b):
    for x, y in zip(maps_of(a), maps_of(b)):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-7), float((x - y).abs().max())


def correlation(a, b):
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


def flags(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])


# ---------------------------------------------------------------- one model, several threads


def test_threads_sharing_a_model_get_their_own_maps(own_toy, scenes):
    a, b = scenes
    jobs = {"agf": lambda: mdetr_agf.explain(own_toy, a.image, a.caption, method="agf"),
            "gae": lambda: mdetr_agf.explain(own_toy, b.image, b.caption, method="gae"),
            "gradcam": lambda: mdetr_agf.explain(own_toy, a.image, a.caption, method="gradcam"),
            "predict": lambda: mdetr_agf.predict(own_toy, b.image, b.caption, threshold=0.0)}
    alone = {name: job() for name, job in jobs.items()}
    start, results, errors = threading.Barrier(len(jobs)), {name: [] for name in jobs}, []

    def work(name):
        start.wait()
        try:
            for _ in range(4):
                results[name].append(jobs[name]())
        except Exception as exc:  # reported below: no error is acceptable here
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for name, runs in results.items():
        assert len(runs) == 4
        for run in runs:
            if name == "predict":
                assert [(d.query, d.box) for d in run.detections] == \
                    [(d.query, d.box) for d in alone[name].detections]
            else:
                assert_same_maps(run, alone[name])


class PredictingTarget(QueryTokenTarget):
    """A target whose score calls predict on the model being explained (as a careless callback would)."""

    def __call__(self, out, *args, **kwargs):
        mdetr_agf.predict(self.model, self.scene.image, self.scene.caption)
        return super().__call__(out, *args, **kwargs)


def test_reentry_from_inside_an_explanation_is_refused(own_toy, scenes):
    a = scenes[0]
    target = PredictingTarget(0, (1,))
    object.__setattr__(target, "model", own_toy)
    object.__setattr__(target, "scene", a)
    before = flags(own_toy)
    with pytest.raises(ModelBusyError, match="already running explain"):
        mdetr_agf.explain(own_toy, a.image, a.caption, target=target, method="gae")
    assert flags(own_toy) == before
    mdetr_agf.predict(own_toy, a.image, a.caption)  # the lock was released


# ---------------------------------------------------------------- frozen models, inference mode, flags


@pytest.mark.parametrize("method", GRADIENT_METHODS + ("rollout",))
def test_frozen_model_explains_as_the_trainable_one(own_toy, scenes, method):
    a = scenes[0]
    reference = mdetr_agf.explain(own_toy, a.image, a.caption, method=method)
    frozen = copy.deepcopy(own_toy).requires_grad_(False)
    assert_same_maps(mdetr_agf.explain(frozen, a.image, a.caption, method=method), reference)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.grad is None for p in frozen.parameters())


def test_every_modules_train_flag_and_every_requires_grad_come_back(own_toy, scenes):
    a = scenes[0]
    model = copy.deepcopy(own_toy).train()
    model.backbone.eval()  # a frozen-backbone fine-tuning set-up
    model.backbone.requires_grad_(False)
    model.transformer.text_encoder.embeddings.requires_grad_(False)
    model.class_embed.eval()
    before = flags(model)
    assert any(before[0]) and not all(before[0]) and any(before[1]) and not all(before[1])
    eval_reference = mdetr_agf.explain(own_toy, a.image, a.caption, method="agf")
    for method in mdetr_agf.METHODS:
        mdetr_agf.explain(model, a.image, a.caption, method=method)
        assert flags(model) == before, method
    assert_same_maps(mdetr_agf.explain(model, a.image, a.caption, method="agf"), eval_reference)


@pytest.mark.parametrize("method", list(mdetr_agf.METHODS))
def test_inside_inference_mode(own_toy, scenes, method):
    a = scenes[0]
    reference = mdetr_agf.explain(own_toy, a.image, a.caption, method=method)
    with torch.inference_mode():
        pixels = prepare(a.image, size=own_toy.input_size)[0]  # an inference tensor
        from_pil = mdetr_agf.explain(own_toy, a.image, a.caption, method=method)
        from_tensor = mdetr_agf.explain(own_toy, pixels, a.caption, method=method)
    assert_same_maps(from_pil, reference)
    assert torch.allclose(from_tensor.input_map, reference.input_map, rtol=1e-5, atol=1e-7)


def test_model_built_in_inference_mode_is_refused_in_one_line(scenes):
    a = scenes[0]
    with torch.inference_mode():
        model = mdetr_agf.load_model("toy")
    with pytest.raises(InputError, match="inference_mode") as info:
        mdetr_agf.explain(model, a.image, a.caption, method="agf")
    assert "\n" not in str(info.value) and "outside inference mode" in str(info.value)
    assert mdetr_agf.predict(model, a.image, a.caption).detections  # predicting needs no autograd


# ---------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_explain_like_float32(own_toy, scenes, dtype):
    a = scenes[0]
    half = copy.deepcopy(own_toy).to(dtype)
    weights = {k: v.clone() for k, v in half.state_dict().items()}
    for method in ("agf", "gae", "rollout"):
        reference = mdetr_agf.explain(own_toy, a.image, a.caption, method=method)
        expl = mdetr_agf.explain(half, a.image, a.caption, method=method)
        for got, want in zip(maps_of(expl), maps_of(reference)):
            assert torch.isfinite(got).all(), method
            assert correlation(got, want) >= 0.99, (method, correlation(got, want))
    after = half.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in weights.items())
    predicted = mdetr_agf.predict(half, a.image, a.caption, threshold=0.5)
    wanted = mdetr_agf.predict(own_toy, a.image, a.caption, threshold=0.5)
    assert [d.query for d in predicted.detections][:2] == [d.query for d in wanted.detections][:2]


def test_images_and_models_of_other_dtypes_are_cast(own_toy, scenes):
    a = scenes[0]
    pixels = prepare(a.image, size=own_toy.input_size)[0]
    want = mdetr_agf.predict(own_toy, pixels, a.caption, threshold=0.0).detections[0].box
    assert np.allclose(mdetr_agf.predict(own_toy, pixels.double(), a.caption, threshold=0.0).detections[0].box,
                       want, atol=1e-3)
    double = copy.deepcopy(own_toy).double()
    assert np.allclose(mdetr_agf.predict(double, pixels.half(), a.caption, threshold=0.0).detections[0].box,
                       want, atol=0.5)
    mixed = copy.deepcopy(own_toy)
    mixed.class_embed.double()
    with pytest.raises(InputError, match="weights mix torch.float32, torch.float64"):
        mdetr_agf.predict(mixed, a.image, a.caption)


# ---------------------------------------------------------------- typed errors for the remaining inputs


def ids_of(model, caption):
    return model.get_tokenizer()(caption, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("case, error, words", [
    ("long caption", InputError, "83 tokens long .* at most 62 token positions"),
    ("ids outside vocabulary", InputError, "outside the model's vocabulary of ids 0 … 349"),
    ("float ids", InputTypeError, "input_ids must hold integers"),
    ("zero mask", InputError, "attention_mask is all zeros"),
    ("method list", InputTypeError, "method must be a name .* agf, gae"),
    ("lone surrogate", InputError, "lone surrogate"),
    ("tokens float", InputTypeError, "token position must be an int"),
    ("tokens object", InputTypeError, "tokens must be a token position"),
])
def test_bad_explain_inputs_get_typed_errors(own_toy, scenes, case, error, words):
    a = scenes[0]
    ids = ids_of(own_toy, a.caption)
    calls = {
        "long caption": lambda: mdetr_agf.explain(own_toy, a.image, " ".join(["circle"] * 81)),
        "ids outside vocabulary": lambda: mdetr_agf.explain(own_toy, a.image, {"input_ids": ids + 1000}),
        "float ids": lambda: mdetr_agf.explain(own_toy, a.image, {"input_ids": ids.float()}),
        "zero mask": lambda: mdetr_agf.explain(own_toy, a.image, {"input_ids": ids,
                                                                  "attention_mask": torch.zeros_like(ids)}),
        "method list": lambda: mdetr_agf.explain(own_toy, a.image, a.caption, method=["agf"]),
        "lone surrogate": lambda: mdetr_agf.explain(own_toy, a.image, "a blue \ud800 circle"),
        "tokens float": lambda: mdetr_agf.explain(own_toy, a.image, a.caption, tokens=torch.tensor([1.0])),
        "tokens object": lambda: mdetr_agf.explain(own_toy, a.image, a.caption, tokens=1.5),
    }
    with pytest.raises(error, match=words) as info:
        calls[case]()
    assert isinstance(info.value, MdetrAgfError)


def test_long_caption_is_refused_by_predict_too(own_toy, scenes):
    with pytest.raises(InputError, match="at most 62 token positions"):
        mdetr_agf.predict(own_toy, scenes[0].image, " ".join(["circle"] * 81))
    with pytest.raises(InputError, match="lone surrogate"):
        mdetr_agf.predict(own_toy, scenes[0].image, "a \udcff circle")


@pytest.mark.parametrize("tokens", [np.int64(1), torch.tensor(1), np.array([1]), torch.tensor([1])])
def test_numpy_and_tensor_tokens_are_accepted(own_toy, scenes, tokens):
    a = scenes[0]
    want = mdetr_agf.explain(own_toy, a.image, a.caption, tokens=[1], method="rollout")
    got = mdetr_agf.explain(own_toy, a.image, a.caption, tokens=tokens, method="rollout", query=np.int32(want.target.query))
    assert got.target == want.target and isinstance(got.target.tokens[0], int)
    assert_same_maps(got, want)


@pytest.mark.parametrize("threshold, error", [(1.5, InputError), (-0.1, InputError), (math.nan, InputError),
                                              ("0.5", InputTypeError), (None, InputTypeError),
                                              (True, InputTypeError)])
def test_predict_threshold_is_a_probability(own_toy, scenes, threshold, error):
    with pytest.raises(error, match="threshold must be"):
        mdetr_agf.predict(own_toy, scenes[0].image, scenes[0].caption, threshold=threshold)
    assert mdetr_agf.predict(own_toy, scenes[0].image, scenes[0].caption, threshold=np.float32(1.0)).detections == []


def test_decompression_bomb_is_an_input_error(own_toy, scenes, tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    scenes[0].image.save(path)  # 160×160 = 25,600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses above twice the limit
    with pytest.raises(InputError, match="too large to decode safely.*MAX_IMAGE_PIXELS"):
        mdetr_agf.predict(own_toy, path, scenes[0].caption)


# ---------------------------------------------------------------- image URLs: bounded in bytes and time


def serve(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/image.png"


class Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_trickling_server_is_cut_at_the_deadline(own_toy, scenes, monkeypatch):
    monkeypatch.setenv("MDETR_AGF_IMAGE_DEADLINE", "1.5")
    monkeypatch.setenv("MDETR_AGF_URL_TIMEOUT", "10")  # each byte comes well within it

    class OneBytePerTick(Quiet):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)

    server, url = serve(OneBytePerTick)
    try:
        began = time.monotonic()
        with pytest.raises(DownloadError, match=r"not complete after 1.5 s.*MDETR_AGF_IMAGE_DEADLINE"):
            mdetr_agf.predict(own_toy, url, scenes[0].caption)
        assert time.monotonic() - began < 3.0
    finally:
        server.shutdown()


def test_trickled_headers_are_cut_at_the_deadline(own_toy, scenes, monkeypatch):
    monkeypatch.setenv("MDETR_AGF_IMAGE_DEADLINE", "1")
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle():
        connection, _ = listener.accept()
        with connection:
            connection.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.wait(0.1):
                connection.sendall(b"X")

    threading.Thread(target=trickle, daemon=True).start()
    try:
        began = time.monotonic()
        with pytest.raises(DownloadError, match="not complete after 1 s"):
            mdetr_agf.predict(own_toy, f"http://127.0.0.1:{listener.getsockname()[1]}/a.png", scenes[0].caption)
        assert time.monotonic() - began < 2.5
    finally:
        stop.set()
        listener.close()


@pytest.mark.parametrize("declared", [True, False])
def test_oversized_image_download_is_refused(own_toy, scenes, monkeypatch, declared):
    monkeypatch.setenv("MDETR_AGF_IMAGE_MAX_BYTES", "5000")

    class Big(Quiet):
        protocol_version = "HTTP/1.1" if declared else "HTTP/1.0"

        def do_GET(self):
            self.send_response(200)
            if declared:
                self.send_header("Content-Length", str(10**6))
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\0" * 10_000)
            except OSError:  # the client hung up, as it should
                pass

    server, url = serve(Big)
    try:
        with pytest.raises(DownloadError, match="larger than 5000 bytes.*MDETR_AGF_IMAGE_MAX_BYTES"):
            mdetr_agf.predict(own_toy, url, scenes[0].caption)
    finally:
        server.shutdown()


def test_image_download_within_limits_works(own_toy, scenes, monkeypatch, tmp_path):
    path = tmp_path / "scene.png"
    scenes[0].image.save(path)
    body = path.read_bytes()
    monkeypatch.setenv("MDETR_AGF_IMAGE_MAX_BYTES", str(len(body)))

    class Image(Quiet):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server, url = serve(Image)
    try:
        got = mdetr_agf.predict(own_toy, url, scenes[0].caption)
        want = mdetr_agf.predict(own_toy, scenes[0].image, scenes[0].caption)
        assert [d.box for d in got.detections] == [d.box for d in want.detections]
    finally:
        server.shutdown()
    monkeypatch.setenv("MDETR_AGF_IMAGE_DEADLINE", "soon")
    with pytest.raises(InputError, match=r"\$MDETR_AGF_IMAGE_DEADLINE must be a positive number"):
        mdetr_agf.predict(own_toy, url, scenes[0].caption)


# ---------------------------------------------------------------- the CLI, as a user runs it


def run_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mdetr_agf", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def scene_file(scenes, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "scene.png"
    scenes[0].image.save(path)
    return path


@pytest.mark.parametrize("args, words", [
    (["explain", "{image}", "{caption}", "--model", "toy", "--out", "figure.xyz"], "cannot write .xyz figures"),
    (["detect", "{image}", "{caption}", "--model", "toy", "--device", "nonsense"], "device 'nonsense' is not a device torch knows"),
    (["detect", "{image}", "{caption}", "--model", "toy", "--device", "cuda:97"], "device 'cuda:97' asks for a CUDA GPU"),
    (["evaluate", "--n", "0"], "--n must be at least 1"),
    (["evaluate", "--methods", ","], "--methods ',' names no method"),
    (["detect", "{image}", "{caption}", "--model", "toy", "--threshold", "2"], "threshold must be between 0 and 1"),
])
def test_cli_errors_are_one_line(scene_file, scenes, tmp_path, args, words):
    args = [a.format(image=scene_file, caption=scenes[0].caption) for a in args]
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("mdetr-agf: error: ") and words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_cli_names_the_file_it_wrote(scene_file, scenes, tmp_path):
    done = run_cli("detect", str(scene_file), scenes[0].caption, "--model", "toy", "--out", "boxes",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote boxes.png" in done.stdout and (tmp_path / "boxes.png").is_file()
    assert not (tmp_path / "boxes").exists()
