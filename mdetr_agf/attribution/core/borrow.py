"""Borrowing a model for one explanation, and giving it back exactly as found.

Explainers need gradients at the inputs and activations, which a frozen model
(``requires_grad_(False)``), ``torch.inference_mode()`` or half precision would deny or spoil:

- every parameter requires grad while the explanation runs, so frozen and trainable models
  give the same maps (``torch.autograd.grad`` is used throughout: no ``.grad`` is written);
- every module is in eval mode, and gets back its *own* train flag afterwards (a model with
  a frozen backbone in eval mode inside a training model stays that way);
- float16 / bfloat16 weights and buffers are swapped for float32 copies (exact: every half
  value is a float32 value) and the originals put back afterwards, because AGF's and GAE's
  normalizations divide by sums that half precision rounds to zero or overflows (NaN maps);
- inference mode is switched off inside the explanation; a model *built* under inference
  mode holds inference tensors, which autograd can never use, and is refused in one line.
"""
import contextlib

import torch

from ...errors import InputError

HALF = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def borrowed(model):
    """Context for one explanation of ``model`` (see the module doc); restores every flag."""
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_inference() for t in tensors):
        raise InputError("this model was loaded under torch.inference_mode(), so its weights are inference "
                         "tensors that autograd cannot use; load it outside inference mode to explain it "
                         "(explaining inside inference mode is fine)")
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    halves = [(t, t.data) for t in tensors if t.dtype in HALF]
    with torch.inference_mode(False):
        try:
            model.eval()
            for p, _ in grads:
                p.requires_grad_(True)
            for t, data in halves:
                t.data = data.float()
            yield
        finally:
            for t, data in halves:
                t.data = data
            for p, flag in grads:
                p.requires_grad_(flag)
            for m, flag in modes:
                m.training = flag
