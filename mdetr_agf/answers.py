"""Decoding MDETR's question-answering heads into words.

CLEVR's answers come from a fixed vocabulary (yes/no, 15 attributes, counts 0–19). GQA's
come from the answer-by-type vocabulary the MDETR authors publish with their annotations;
it is downloaded and cached like a checkpoint the first time a GQA answer is decoded.
"""
import json

from . import hub

CLEVR_ATTRIBUTES = ["small", "large", "gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow",
                    "cube", "sphere", "cylinder", "rubber", "metal"]
# GQA: the answer-type head's classes, in the order the authors' evaluation reads them.
GQA_TYPES = ["answer_obj", "answer_attr", "answer_rel", "answer_global", "answer_cat"]


def decode_clevr(out, i=0):
    kind = int(out["pred_answer_type"][i].argmax())
    if kind == 0:
        return "yes" if float(out["pred_answer_binary"][i].sigmoid()) > 0.5 else "no"
    if kind == 1:
        return CLEVR_ATTRIBUTES[int(out["pred_answer_attr"][i].argmax())]
    return str(int(out["pred_answer_reg"][i].argmax()))


def gqa_vocabulary(path=None):
    """{answer type: {id: answer}} from ``gqa_answer2id_by_type.json`` (downloaded if needed)."""
    path = path or hub.resolve_asset("gqa_answer2id_by_type")
    with open(path) as f:
        by_type = json.load(f)
    return {kind: {int(v): k for k, v in answers.items()} for kind, answers in by_type.items()}


def decode_gqa(out, i=0, vocabulary=None):
    vocabulary = vocabulary or gqa_vocabulary()
    kind = GQA_TYPES[int(out["pred_answer_type"][i].argmax())]
    head = "pred_" + kind
    return vocabulary[kind][int(out[head][i].argmax())]


def decode_answer(model, out, i=0, vocabulary=None):
    dataset = getattr(model, "qa_dataset", None)
    if dataset == "clevr":
        return decode_clevr(out, i)
    if dataset == "gqa":
        return decode_gqa(out, i, vocabulary)
    return None
