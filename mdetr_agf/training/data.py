"""Training data: ShapesWorld scenes, extra captions of each image, and the batches MDETR's losses
read (image tensors, tokenized captions, target boxes and the positive maps that tie each box to
its phrase's tokens)."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.ops import box_convert

from .. import shapesworld
from ..errors import InputError
from ..images import prepare
from ..inputs import scale
from ..text import MAX_POSITIONS, char_span_to_tokens, tokenize
from .config import TrainConfig
from .toy import TOY_INPUT_SIZE

#: The object attributes the auxiliary attribute loss asks the matched queries for, in class order.
ATTRIBUTES = {"colour": list(shapesworld.COLOURS), "shape": list(shapesworld.SHAPES),
              "size": list(shapesworld.SIZES)}


@dataclass
class Batch:
    images: torch.Tensor  # (N / repeats, 3, S, S), normalized: each image once
    text: dict  # input_ids, attention_mask (and offset_mapping): N captions
    targets: list[dict]  # per caption: boxes (T, 4) cxcywh in [0, 1], tokens: list of T token lists
    positive_map: torch.Tensor  # (all targets, 256), rows sum to 1
    scenes: list = field(default_factory=list, repr=False)
    repeats: int = 1  # captions per image: captions k·repeats … (k+1)·repeats − 1 describe image k


def phrase_token_lists(encoding, batch_index: int, phrases: Sequence[shapesworld.Phrase]) -> list[list[int]]:
    """Token positions of each phrase's character span (row ``batch_index`` of ``encoding``)."""
    return [char_span_to_tokens(encoding, batch_index, *p.char_span) for p in phrases]


def positive_map(token_lists: Sequence[Sequence[int]], max_positions: int = MAX_POSITIONS) -> torch.Tensor:
    """(targets, 256): 1 on each target's token positions, each row normalized to sum 1."""
    out = torch.zeros(len(token_lists), max_positions)
    for row, tokens in enumerate(token_lists):
        if not tokens:
            raise InputError(f"target {row} covers no token; every phrase must cover at least one token")
        if max(tokens) >= max_positions - 1:
            raise InputError(f"token position {max(tokens)} is past the {max_positions - 1} usable positions")
        out[row, list(tokens)] = 1.0
    return out / out.sum(-1, keepdim=True)


def scene_tensor(image, size: int = TOY_INPUT_SIZE) -> torch.Tensor:
    """A ShapesWorld image as the toy model sees it (the rule of ``inputs.model_input``)."""
    return prepare(image, *scale(size))[0]


def training_scene(seed: int, similar: float = 0.0) -> shapesworld.Scene:
    """ShapesWorld scene ``seed``, or, for a share ``similar`` of the seeds, a scene whose
    objects are drawn from one or two shapes (chosen by a generator seeded by ``(seed, 1)``).
    In the world's own scenes shape and size single out most objects, and the toy trained on
    them with MDETR's losses alone never learns colour, so "the red circle" next to a blue
    circle is a coin toss. Scenes of similar objects make the colour words matter more often;
    within the training budget that did not help (the attribute loss did: docs/evaluation.md)."""
    rng = np.random.Generator(np.random.PCG64([int(seed), 1]))
    if rng.random() >= similar:
        return shapesworld.make_scene(seed)
    shapes = tuple(str(s) for s in rng.choice(shapesworld.SHAPES, size=int(rng.integers(1, 3)), replace=False))
    return shapesworld.make_scene(seed, shapes=shapes)


def caption_variants(scene: shapesworld.Scene, seed: int, count: int,
                     all_objects: int = 0, contrast: int = 0) -> list[shapesworld.Scene]:
    """The scene itself and ``count − 1`` more captions of its image, drawn by ShapesWorld's own
    caption writer from generators seeded by ``(seed, k)``: more referring expressions for one
    backbone pass (the image features do not depend on the caption). The last ``all_objects``
    of them name every object instead (:func:`all_objects_caption`); the ``contrast`` before
    those refer to objects that share their shape with another one (:func:`contrast_caption`)."""
    variants = [scene]
    for k in range(1, count):
        rng = np.random.Generator(np.random.PCG64([int(seed), k]))
        if k >= count - all_objects:
            caption, phrases = all_objects_caption(rng, scene.objects)
        elif k >= count - all_objects - contrast:
            caption, phrases = contrast_caption(rng, scene.objects, scene.image.size[0])
        else:
            caption, phrases = shapesworld._caption(rng, scene.objects, scene.image.size[0])
        variants.append(shapesworld.Scene(scene.image, caption, scene.objects, phrases))
    return variants


def all_objects_caption(rng: np.random.Generator, objects) -> tuple[str, list[shapesworld.Phrase]]:
    """"a small red circle and a large blue star ...": every object in a random order, fully
    described. Like the fully annotated captions of MDETR's pre-training, it gives every object
    a phrase, so the contrastive alignment learns each object's words from every image, not only
    from the one or two objects a referring expression picks out."""
    caption, phrases = "", []
    for i in rng.permutation(len(objects)):
        o = objects[int(i)]
        if caption:
            caption += " and "
        text = f"{shapesworld.ARTICLES[rng.integers(len(shapesworld.ARTICLES))]} {o.size} {o.colour} {o.shape}"
        phrases.append(shapesworld.Phrase(text, (len(caption), len(caption) + len(text)), int(i)))
        caption += text
    return caption, phrases


def contrast_caption(rng: np.random.Generator, objects, size: int) -> tuple[str, list[shapesworld.Phrase]]:
    """A referring expression for one or two objects of a shape the image holds more than once
    ("the red circle and the blue circle"), written by ShapesWorld's caption writer: only the
    colour or size words tell the referents apart, the signal the world's own captions give
    least often (about one phrase in six); an ordinary caption when no shape repeats."""
    shapes = [o.shape for o in objects]
    repeated = [i for i, shape in enumerate(shapes) if shapes.count(shape) > 1]
    if not repeated:
        return shapesworld._caption(rng, objects, size)
    first = int(rng.choice(repeated))
    twins = [i for i in repeated if i != first and shapes[i] == shapes[first]]
    picked = [first] if rng.random() < 0.5 else [first, int(rng.choice(twins))]
    return shapesworld._caption(rng, objects, size, picked)


def make_batch(scenes: Sequence[shapesworld.Scene], tokenizer, size: int = TOY_INPUT_SIZE,
               repeats: int = 1) -> Batch:
    """Tensors and targets for ``scenes``; with ``repeats`` > 1, each run of ``repeats``
    consecutive scenes must share one image, which is then stored once."""
    if len(scenes) % repeats:
        raise InputError(f"{len(scenes)} scenes do not split into runs of {repeats}")
    encoding = tokenize(tokenizer, [s.caption for s in scenes])
    targets, maps = [], []
    for i, scene in enumerate(scenes):
        width, height = scene.image.size
        tokens = phrase_token_lists(encoding, i, scene.phrases)
        xyxy = torch.tensor([scene.objects[p.object_index].box_xyxy for p in scene.phrases], dtype=torch.float32)
        xyxy = xyxy / torch.tensor([width, height, width, height], dtype=torch.float32)
        attributes = [[names.index(getattr(scene.objects[p.object_index], a)) for a, names in ATTRIBUTES.items()]
                      for p in scene.phrases]
        attributes = torch.tensor(attributes, dtype=torch.long).view(-1, len(ATTRIBUTES))
        targets.append({"boxes": box_convert(xyxy, "xyxy", "cxcywh"), "tokens": tokens, "attributes": attributes})
        maps.append(positive_map(tokens))
    images = torch.stack([scene_tensor(s.image, size) for s in scenes[::repeats]])
    text = {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"],
            "offset_mapping": encoding["offset_mapping"]}
    return Batch(images, text, targets, torch.cat(maps), list(scenes), repeats)


def step_seeds(config: TrainConfig) -> Iterator[list[int]]:
    """The scene seeds of every step's whole batch: the pool shuffled by ``config.seed``, walked
    through epoch by epoch (a resumed run replays this order to find its place)."""
    pool = np.asarray(list(config.scene_seeds), dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(config.seed))
    order, cursor = rng.permutation(pool), 0
    for _ in range(config.steps):
        chosen = []
        while len(chosen) < config.batch_size:
            if cursor == len(order):
                order, cursor = rng.permutation(pool), 0
            take = order[cursor: cursor + config.batch_size - len(chosen)]
            chosen.extend(int(s) for s in take)
            cursor += len(take)
        yield chosen


def training_batches(config: TrainConfig, tokenizer, first: int = 0, rank: int = 0,
                     world: int = 1) -> Iterator[Batch]:
    """Steps ``first`` … ``config.steps − 1``: this process's share of each step's images (share
    ``rank`` of ``world`` equal ones), each with its ``captions_per_image`` captions."""
    share = config.batch_size // world
    for step, chosen in enumerate(step_seeds(config)):
        if step < first:
            continue  # already trained on (resuming): only the order is replayed
        scenes = [v for s in chosen[rank * share: (rank + 1) * share]
                  for v in caption_variants(training_scene(s, config.similar_scenes), s, config.captions_per_image,
                                            config.all_objects_captions, config.contrast_captions)]
        yield make_batch(scenes, tokenizer, repeats=config.captions_per_image)


def prefetch(iterator, depth: int = 2):
    """Yield the iterator's items, producing the next ones in a background thread (scene
    drawing is numpy and PIL, which release the GIL while the model trains)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)
            return
        q.put(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)
