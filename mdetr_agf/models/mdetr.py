"""MDETR: backbone + text encoder → joint encoder → decoder → heads.

One implementation serves prediction and every explainer. ``forward`` takes what a user
has (a list of normalized image tensors of any sizes, and captions as strings or token
ids) and returns the original output names. ``encode`` exposes the intermediate memory.
"""
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .segmentation import MaskHeadSmallConv, MHAttentionMap


class MLP(nn.Module):
    """A few Linear layers with ReLU between them (the box head, CLEVR's count head)."""

    def __init__(self, in_dim, hidden, out_dim, num_layers):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))
        self.activations = nn.ModuleList(nn.ReLU() for _ in range(num_layers - 1))

    def forward(self, x):
        for layer, act in zip(self.layers, self.activations):
            x = act(layer(x))
        return self.layers[-1](x)


QA_HEADS = {
    # dataset -> [(output name, head attribute, size)], in the order of the QA query slots
    "gqa": [("pred_answer_type", "answer_type_head", 5), ("pred_answer_obj", "answer_obj_head", 3),
            ("pred_answer_rel", "answer_rel_head", 1594), ("pred_answer_attr", "answer_attr_head", 403),
            ("pred_answer_cat", "answer_cat_head", 678), ("pred_answer_global", "answer_global_head", 111)],
    "clevr": [("pred_answer_type", "answer_type_head", 3), ("pred_answer_binary", "answer_binary_head", 1),
              ("pred_answer_reg", "answer_reg_head", 20), ("pred_answer_attr", "answer_attr_head", 15)],
}


def pad_images(images):
    """List of 3×H×W tensors → (N, 3, Hmax, Wmax) zero-padded bottom/right, mask True on padding."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return images, torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    batch = images[0].new_zeros(len(images), 3, h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]] = im
        mask[i, : im.shape[-2], : im.shape[-1]] = False
    return batch, mask


def resolve_tokenizer(name):
    """A relative folder that exists inside the package (a bundled tokenizer, such as the toy
    model's ``assets/toy/tokenizer``) becomes its absolute path; anything else is unchanged."""
    if isinstance(name, str) and name and not os.path.isabs(name):
        bundled = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name)
        if os.path.isdir(bundled):
            return bundled
    return name


class MDETR(nn.Module):
    def __init__(self, backbone, transformer, num_queries, qa_dataset=None, contrastive_align=True,
                 num_classes=255, contrastive_dim=64):
        super().__init__()
        dim = transformer.d_model
        self.num_queries = num_queries
        self.transformer = transformer
        self.class_embed = nn.Linear(dim, num_classes + 1)
        self.bbox_embed = MLP(dim, dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, dim)
        self.qa_dataset = qa_dataset
        if qa_dataset is not None:
            self.qa_embed = nn.Embedding(len(QA_HEADS[qa_dataset]), dim)
            for _, attr, size in QA_HEADS[qa_dataset]:
                setattr(self, attr, MLP(dim, dim, size, 3) if attr == "answer_reg_head" else nn.Linear(dim, size))
        self.input_proj = nn.Conv2d(backbone.num_channels, dim, kernel_size=1)
        self.backbone = backbone
        self.contrastive_align = contrastive_align
        if contrastive_align:
            self.contrastive_align_projection_image = nn.Linear(dim, contrastive_dim)
            self.contrastive_align_projection_text = nn.Linear(dim, contrastive_dim)
        self.tokenizer = None  # set by load_model; needed only when captions come as strings

    # -- inputs ---------------------------------------------------------------------------
    def tokenize(self, text, device):
        if isinstance(text, Mapping):
            return text["input_ids"].to(device), text["attention_mask"].to(device)
        from ..text import tokenize

        if isinstance(text, str):
            text = [text]
        enc = tokenize(self.get_tokenizer(), text)
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def get_tokenizer(self):
        """The caption tokenizer, loaded on first use (the hub is needed only for strings)."""
        if self.tokenizer is None:
            from ..text import load_tokenizer

            self.tokenizer = load_tokenizer(resolve_tokenizer(self.config.tokenizer or self.config.text_encoder))
        return self.tokenizer

    # -- question answering -----------------------------------------------------------------
    def qa_heads(self):
        """The QA heads' short names ('type', 'binary', 'reg', 'attr' / 'obj', 'rel', 'cat', …), in
        the order of their decoder query slots; empty for a model without QA heads."""
        return [name.removeprefix("pred_answer_") for name, _, _ in QA_HEADS.get(self.qa_dataset, [])]

    def qa_slot(self, head):
        """The decoder query slot QA head ``head`` reads: the QA slots follow the detection queries."""
        heads = self.qa_heads()
        if head not in heads:
            raise KeyError(f"no QA head {head!r}; this model has {', '.join(heads) or 'none'}")
        return self.num_queries + heads.index(head)

    def qa_output_layer(self, head):
        """The name (under this model) of the layer whose output is QA head ``head``'s logits: the
        head itself, or the last Linear of an MLP head (CLEVR's count head)."""
        self.qa_slot(head)  # an unknown head is refused
        attr = f"answer_{head}_head"
        module = getattr(self, attr)
        return f"{attr}.layers.{len(module.layers) - 1}" if isinstance(module, MLP) else attr

    # -- stages ---------------------------------------------------------------------------
    def encode(self, images, text, mask=None, repeats=1):
        """Backbone, text encoder and joint encoder. Returns a dict of batch-first tensors.

        ``repeats`` > 1: ``text`` holds ``repeats`` captions per image (those of image k at
        k·repeats …); the backbone runs once per image and its features are repeated, which gives
        the numbers of encoding every pair on its own (``features``, ``masks``, ``src_proj``
        stay one per image)."""
        if mask is None:
            images, mask = pad_images(images)
        features, masks, pos = self.backbone(images, mask)
        src = self.input_proj(features[-1])
        n, dim, h, w = src.shape
        input_ids, attention_mask = self.tokenize(text, src.device)
        text_memory_resized = self.transformer.resizer(self.transformer.text_encoder(input_ids, attention_mask))
        per_caption = (lambda t: t) if repeats == 1 else (lambda t: t.repeat_interleave(repeats, 0))
        joint = torch.cat([per_caption(src.flatten(2).transpose(1, 2)), text_memory_resized], dim=1)
        joint_pos = torch.cat([per_caption(pos.flatten(2).transpose(1, 2)), torch.zeros_like(text_memory_resized)],
                              dim=1)
        joint_mask = torch.cat([per_caption(masks[-1].flatten(1)), attention_mask.eq(0)], dim=1)
        memory = self.transformer.encoder(joint, joint_pos, joint_mask)
        return {"features": features, "masks": masks, "src_proj": src, "img_memory": memory,
                "pos": joint_pos, "mask": joint_mask, "text_memory_resized": text_memory_resized,
                "text_memory": memory[:, h * w:], "input_ids": input_ids, "attention_mask": attention_mask}

    def decode(self, cache):
        query = self.query_embed.weight
        if self.qa_dataset is not None:
            query = torch.cat([query, self.qa_embed.weight], 0)
        n = cache["img_memory"].shape[0]
        query = query.unsqueeze(0).expand(n, -1, -1)
        return self.transformer.decoder(torch.zeros_like(query), query, cache["img_memory"], cache["pos"],
                                        cache["mask"])

    def heads(self, states, cache):
        out = {}
        last = states[-1]
        if self.qa_dataset is not None:
            for head, (name, attr, _) in zip(self.qa_heads(), QA_HEADS[self.qa_dataset]):
                # as the original: the QA heads read the first decoder layer
                out[name] = getattr(self, attr)(states[0][:, self.qa_slot(head)])
            if "pred_answer_binary" in out:
                out["pred_answer_binary"] = out["pred_answer_binary"].squeeze(-1)
            last = last[:, : self.num_queries]
        out["pred_logits"] = self.class_embed(last)
        out["pred_boxes"] = self.bbox_embed(last).sigmoid()
        if self.contrastive_align:
            out["proj_queries"] = F.normalize(self.contrastive_align_projection_image(last), p=2, dim=-1)
            out["proj_tokens"] = F.normalize(self.contrastive_align_projection_text(cache["text_memory"]), p=2, dim=-1)
        out["hidden_states"] = last
        return out

    def forward(self, images, text, mask=None):
        cache = self.encode(images, text, mask)
        out = self.heads(self.decode(cache), cache)
        out["attention_mask"] = cache["attention_mask"]
        return out


class MDETRSegmentation(nn.Module):
    """PhraseCut wrapper: the detector under ``detr.``, a box-attention map and an FPN mask head."""

    def __init__(self, detr):
        super().__init__()
        self.detr = detr
        dim, heads = detr.transformer.d_model, detr.transformer.nhead
        self.bbox_attention = MHAttentionMap(dim, dim, heads)
        self.mask_head = MaskHeadSmallConv(dim + heads, detr.backbone[0].interm_channels[::-1], dim)

    @property
    def qa_dataset(self):
        return None

    def get_tokenizer(self):
        return self.detr.get_tokenizer()

    def forward(self, images, text, mask=None):
        cache = self.detr.encode(images, text, mask)
        out = self.detr.heads(self.detr.decode(cache), cache)
        src = cache["src_proj"]
        n, dim, h, w = src.shape
        image_memory = cache["img_memory"][:, : h * w].transpose(1, 2).reshape(n, dim, h, w)
        box_maps = self.bbox_attention(out["hidden_states"], image_memory, cache["masks"][-1])
        fpns = cache["features"][:-1][::-1]
        masks = self.mask_head(src, box_maps, fpns)
        out["pred_masks"] = masks.view(n, self.detr.num_queries, *masks.shape[-2:])
        out["attention_mask"] = cache["attention_mask"]
        return out


def core(model):
    """The detector inside a PhraseCut wrapper (``MDETRSegmentation.detr``), or the model itself."""
    return getattr(model, "detr", model)


def module_prefix(model):
    """The qualified-name prefix of the detector's modules in ``model`` ('detr.' in a wrapper)."""
    return "detr." if hasattr(model, "detr") else ""
