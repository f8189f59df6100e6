"""scripts/eval_refcoco.py on files laid out as MDETR's RefCOCO annotations and COCO's image
folder, made from ShapesWorld scenes (so the bundled toy model understands the expressions)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mdetr_agf import shapesworld

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval_refcoco.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("eval_refcoco", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _refcoco_files(folder: Path, seeds):
    """One COCO 'image' per expression, as in final_refcoco_val.json; polygons for the masks."""
    images_dir = folder / "train2014"
    images_dir.mkdir()
    images, annotations = [], []
    for seed in seeds:
        scene = shapesworld.make_scene(seed)
        name = f"COCO_train2014_{seed:012d}.jpg"
        scene.image.save(images_dir / name, quality=95)
        for k, phrase in enumerate(scene.phrases):  # each phrase becomes one referring expression
            entry_id = len(images)
            x0, y0, x1, y1 = scene.objects[phrase.object_index].box_xyxy
            images.append({"file_name": name, "height": 160, "width": 160, "id": entry_id, "original_id": seed,
                           "caption": phrase.text, "dataset_name": "refcoco",
                           "tokens_positive_eval": [[[0, len(phrase.text)]]]})
            annotations.append({"image_id": entry_id, "id": entry_id, "original_id": seed * 10 + phrase.object_index,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                                "category_id": 1, "tokens_positive": [[0, len(phrase.text)]],
                                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    path = folder / "final_refcoco_val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    return path, images_dir, len(images)


def test_scores_real_format_annotations_with_the_toy_model(script, tmp_path):
    seeds = [s for s in range(4_000_000, 4_000_040) if len(shapesworld.make_scene(s).phrases) == 2][:3]
    path, images_dir, count = _refcoco_files(tmp_path, seeds)
    out = tmp_path / "out.json"
    result = script.main(["--images", str(images_dir), "--annotations", str(path), "--model", "toy",
                          "--methods", "agf,raw_attention", "--n", "100", "--json", str(out), "--no-progress"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["detection"]["n"] == count == 6 and result["data"]["skipped"] == 0
    assert result["data"]["masks_from_boxes"] == 0
    for method in ("agf", "raw_attention"):
        s = result["methods"][method]
        assert all(0 <= s[k] <= 1 for k in ("pointing_game", "energy_in_box", "mask_iou", "specificity"))
        assert np.isfinite(s["deletion_auc"]) and np.isfinite(s["insertion_auc"])


def test_records_follow_the_annotation_fields(script):
    data = {"images": [{"file_name": "a.jpg", "id": 7, "original_id": 3, "caption": "the dog on the left",
                        "tokens_positive_eval": [[[0, 7]]], "width": 10, "height": 8}],
            "annotations": [{"image_id": 7, "id": 1, "bbox": [1, 2, 3, 4], "segmentation": {"counts": "x"}}]}
    (record,) = script.expressions(data)
    assert record["span"] == (0, 7) and record["box"] == (1, 2, 4, 6) and record["coco_image"] == 3
    assert script.polygon_mask(record["segmentation"], 10, 8) is None  # RLE: the box stands in
    mask = script.polygon_mask([[1, 1, 5, 1, 5, 4, 1, 4]], 10, 8)
    assert mask[2, 3] and not mask[6, 8]


def test_missing_images_folder_says_what_to_pass(script, tmp_path):
    with pytest.raises(SystemExit, match="train2014"):
        script.main(["--images", str(tmp_path / "nowhere"), "--annotations", str(tmp_path / "x.json")])


def test_two_torchrun_ranks_write_the_single_process_json(tmp_path):
    """``torchrun --nproc_per_node=2 scripts/eval_refcoco.py``: the expressions are shared by index,
    and rank 0 writes the JSON one process writes, apart from ``world_size``."""
    import os
    import subprocess
    import sys

    seeds = [s for s in range(4_000_000, 4_000_040) if len(shapesworld.make_scene(s).phrases) == 2][:2]
    path, images_dir, count = _refcoco_files(tmp_path, seeds)
    args = [str(SCRIPT), "--images", str(images_dir), "--annotations", str(path), "--model", "toy",
            "--methods", "agf,raw_attention", "--expressions", "100", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = []
    for launcher, name in (([sys.executable], "one"),
                           ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                            "two")):
        out = tmp_path / f"{name}.json"
        done = subprocess.run(launcher + args + ["--json", str(out)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(json.loads(out.read_text()))
    assert [r.pop("world_size") for r in results] == [1, 2]
    assert results[0] == results[1] and results[0]["detection"]["n"] == count == 4
