"""Forward hooks that keep what the explanation methods read, and nothing else.

The model is never modified: hooks are registered on entry and removed on exit (also when an
error is raised). They record the word embeddings (where token relevance is read), the
attention probabilities of every transformer (grouped by where they sit), the backbone's last
feature map and its projection (where the grid maps are read).
"""
import contextlib

from torch import nn

from ...models.mdetr import core, module_prefix

ATTENTION_GROUPS = ("text", "encoder", "decoder_self", "decoder_cross")


def attention_group(name):
    if "text_encoder" in name:
        return "text"
    if ".encoder." in name:
        return "encoder"
    if "cross_attn_image" in name:
        return "decoder_cross"
    if ".decoder." in name:
        return "decoder_self"
    return None  # PhraseCut's box-attention map: a head, not a transformer layer


class Capture(contextlib.AbstractContextManager):
    def __init__(self, model):
        self.model, self.handles = model, []
        self.embeddings = self.features = self.src = None
        self.attentions = {g: [] for g in ATTENTION_GROUPS}

    def __enter__(self):
        detr = core(self.model)
        prefix = module_prefix(self.model)
        self._hook(detr.transformer.text_encoder.embeddings.word_embeddings, "embeddings")
        self._hook(detr.backbone[0], "features", pick=lambda out: out[-1])
        self._hook(detr.input_proj, "src")
        for name, module in self.model.named_modules():
            group = attention_group(name.removeprefix(prefix))
            if isinstance(module, nn.Softmax) and group is not None:
                self.handles.append(module.register_forward_hook(
                    lambda m, args, out, g=group: self.attentions[g].append(out)))
        return self

    def _hook(self, module, attribute, pick=lambda out: out):
        self.handles.append(module.register_forward_hook(
            lambda m, args, out: setattr(self, attribute, pick(out))))

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        return False
