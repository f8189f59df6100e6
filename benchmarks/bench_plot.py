"""Time to draw and save an explanation figure of a 12-megapixel photo, against a 160-px one.

    python benchmarks/bench_plot.py

Large images are resized to the display size before blending, so the photo's size should barely
matter; the figure (heatmap, colorbar, token strip) is saved as a PNG at ``plot.SAVE_DPI``.
"""
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mdetr_agf import plot  # noqa: E402
from mdetr_agf.explanation import Explanation  # noqa: E402


def explanation(width, height):
    rng = np.random.default_rng(0)
    heat = torch.from_numpy(rng.standard_normal((height // 32, width // 32)).astype(np.float32))
    heat = torch.nn.functional.interpolate(heat[None, None], size=(height, width), mode="bilinear")[0, 0]
    tokens = ["<s>", "a", "cat", "lying", "on", "a", "pink", "blanket", "</s>"]
    return Explanation(heat, torch.rand(len(tokens)), tokens, "query 0, tokens [2]", "agf", phrase="a cat",
                       grid=torch.zeros(height // 32, width // 32))


def best_of(repeats, width, height):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (height, width, 3), dtype=np.uint8))
    expl = explanation(width, height)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        plot.plot_explanation(expl, image).savefig(io.BytesIO(), format="png", dpi=plot.SAVE_DPI)
        times.append(time.perf_counter() - start)
    return min(times)


if __name__ == "__main__":
    small = best_of(3, 160, 160)
    large = best_of(3, 4000, 3000)
    print(f"plot_explanation + PNG at {plot.SAVE_DPI} dpi: 160×160 {small:.2f} s, 4000×3000 (12 MP) {large:.2f} s, "
          f"ratio {large / small:.2f}")
