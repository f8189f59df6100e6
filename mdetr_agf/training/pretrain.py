"""Masked-language-model pre-training of the toy's text encoder on ShapesWorld captions."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import shapesworld
from ..text import tokenize
from .data import caption_variants
from .toy import TRAIN_SEEDS


def pretrain_text_encoder(model, tokenizer, steps: int, seed: int = 0, lr: float = 1e-3, batch_size: int = 64,
                          log=None) -> list[float]:
    """Masked-language-model training of the text encoder alone on ShapesWorld captions.

    MDETR starts from a pre-trained RoBERTa, whose token features already say which word they
    are; a text encoder trained from scratch inside the detector has no reason to keep that
    apart ("red" and "blue" end up alike), and the detector then cannot bind words to objects.
    RoBERTa's recipe on this world's captions: 15 % of the tokens are chosen, 80 % of those
    masked, 10 % replaced by a random word, 10 % kept, and all of them predicted. The prediction
    head is thrown away afterwards; the model's parameter names do not change.
    """
    encoder = model.transformer.text_encoder
    hidden = encoder.embeddings.word_embeddings.embedding_dim
    vocab = encoder.embeddings.word_embeddings.num_embeddings
    generator = torch.Generator().manual_seed(seed)
    head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, vocab))
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr, weight_decay=0.01)
    rng = np.random.Generator(np.random.PCG64([seed, 7]))
    special_ids = set(tokenizer.all_special_ids)
    special = torch.tensor(sorted(special_ids))
    words = torch.tensor([i for i in range(len(tokenizer)) if i not in special_ids])
    encoder.train()
    losses = []
    for step in range(steps):
        captions = []
        for s in rng.integers(0, TRAIN_SEEDS.stop, size=batch_size // 4):
            scene = shapesworld.make_scene(int(s))
            captions += [v.caption for v in caption_variants(scene, int(s), 4, all_objects=1)]
        enc = tokenize(tokenizer, captions)
        ids, attention = enc["input_ids"], enc["attention_mask"]
        maskable = attention.bool() & ~torch.isin(ids, special)
        chosen = (torch.rand(ids.shape, generator=generator) < 0.15) & maskable
        roll = torch.rand(ids.shape, generator=generator)
        inputs = ids.clone()
        inputs[chosen & (roll < 0.8)] = tokenizer.mask_token_id
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        inputs[swap] = words[torch.randint(len(words), (int(swap.sum()),), generator=generator)]
        logits = head(encoder(inputs, attention))
        loss = F.cross_entropy(logits[chosen], ids[chosen])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % 100 == 0:
            log(f"text pre-training step {step + 1}/{steps}  masked-LM loss {np.mean(losses[-100:]):.3f}")
    return losses
