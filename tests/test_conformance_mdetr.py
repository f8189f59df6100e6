"""Every family, loaded from a Zenodo-format file, reproduces the original MDETR's outputs.

The ground truth was recorded by the original code in its 2021 environment on deterministic
stand-in weights; the published files of each family share that exact layout.
"""
import numpy as np
import pytest
import torch

import mdetr_agf
from mdetr_agf.errors import CheckpointError

from conftest import conformance_path, write_zenodo_checkpoint

FAMILIES = ["mdetr_resnet101", "mdetr_efficientnetB3", "mdetr_efficientnetB5", "mdetr_clevr",
            "mdetr_resnet101_gqa", "mdetr_efficientnetB5_gqa", "mdetr_resnet101_phrasecut",
            "mdetr_efficientnetB3_phrasecut"]
TOLERANCE = 1e-4


def recorded(family):
    return dict(np.load(conformance_path("mdetr", f"{family}.npz")))


def run(model, z):
    text = {"input_ids": torch.from_numpy(z["input_ids"]), "attention_mask": torch.from_numpy(z["attention_mask"])}
    with torch.no_grad():
        return model(images=[torch.from_numpy(z["image0"]), torch.from_numpy(z["image1"])], text=text)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_reproduces_original_outputs(family, tmp_path, cache):
    z = recorded(family)
    path = write_zenodo_checkpoint(family, tmp_path / f"{family}_checkpoint.pth")
    model = mdetr_agf.load_model(family, checkpoint=path)
    out = run(model, z)
    expected = {k[4:]: v for k, v in z.items() if k.startswith("out_")}
    assert expected, "fixture has no outputs"
    for name, value in expected.items():
        got = out[name].numpy()
        assert got.shape == value.shape, name
        err = float(np.abs(got - value).max())
        assert err <= TOLERANCE, f"{family} {name}: max abs error {err:.2e} > {TOLERANCE}"
    if "cache_img_memory" in z:  # the intermediate memory too (fixtures are sequence-first)
        cache_out = model.encode([torch.from_numpy(z["image0"]), torch.from_numpy(z["image1"])],
                                 {"input_ids": torch.from_numpy(z["input_ids"]),
                                  "attention_mask": torch.from_numpy(z["attention_mask"])})
        for key in ("img_memory", "text_memory", "text_memory_resized"):
            got = cache_out[key].detach().transpose(0, 1).numpy()
            assert np.abs(got - z[f"cache_{key}"]).max() <= TOLERANCE, key
    # The second load reads the slim weights-only copy and gives the same model.
    slim = sorted(tmp_path.glob("*.safetensors"))
    assert slim, "first load should leave a slim safetensors copy beside the checkpoint"
    again = run(mdetr_agf.load_model(family, checkpoint=path), z)
    assert torch.equal(again["pred_logits"], out["pred_logits"])


def test_padded_batch_equals_pre_padded_tensor():
    """Images of different sizes are padded bottom/right with a mask, as the original did."""
    family = "mdetr_clevr"
    z = recorded(family)
    from mdetr_agf.models.mdetr import pad_images

    batch, mask = pad_images([torch.from_numpy(z["image0"]), torch.from_numpy(z["image1"])])
    assert torch.equal(batch, torch.from_numpy(z["samples_tensor"]))
    assert torch.equal(mask, torch.from_numpy(z["samples_mask"]))


def test_file_of_another_architecture_is_named(tmp_path, cache):
    path = write_zenodo_checkpoint("mdetr_clevr", tmp_path / "clevr_checkpoint.pth")
    with pytest.raises(CheckpointError) as info:
        mdetr_agf.load_model("mdetr_resnet101_gqa", checkpoint=path)
    message = str(info.value)
    assert "looks like architecture 'mdetr_clevr'" in message
    assert "missing keys" in message and "unexpected keys" in message


def test_ema_weights_are_read_on_request(tmp_path, cache):
    family = "mdetr_clevr"
    path = write_zenodo_checkpoint(family, tmp_path / "clevr_checkpoint.pth", ema=True)
    plain = mdetr_agf.load_model(family, checkpoint=path)
    ema = mdetr_agf.load_model(family, checkpoint=path, use_ema=True)
    w_plain, w_ema = plain.class_embed.weight, ema.class_embed.weight
    assert torch.allclose(w_ema, w_plain + 1)
