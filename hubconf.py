"""torch.hub entry points: one per checkpoint of ``checkpoints.json``.

    import torch
    repo = "RU-CS535-ADOX/Interpreting-MDETR-Using-Attribution-Guided-Factorization"
    model = torch.hub.load(repo, "mdetr_resnet101")    # downloads the weights once
    model = torch.hub.load(repo, "toy")                # bundled, offline
    model = torch.hub.load(".", "mdetr_clevr", source="local", checkpoint="clevr_checkpoint.pth")
"""
dependencies = ["torch", "torchvision", "timm", "transformers", "safetensors", "requests", "tqdm"]

from mdetr_agf import hub as _hub  # noqa: E402


def _entry_point(name, entry):
    def load(pretrained=True, checkpoint=None, device=None, use_ema=False, tokenizer=None, full_download=False):
        from mdetr_agf.models import build_model, load_model

        if not pretrained:
            return build_model(entry.model_config)
        return load_model(name, checkpoint=checkpoint, device=device, use_ema=use_ema, tokenizer=tokenizer,
                          full_download=full_download)

    metric = entry.metric
    load.__name__ = name
    load.__doc__ = (f"MDETR {entry.architecture} ({entry.task}): {entry.description}\n"
                    f"{metric.get('name', '')}: {metric.get('value', '')}. Weights: {entry.url or 'bundled'}.")
    return load


for _name, _entry in _hub.registry().items():
    globals()[_name] = _entry_point(_name, _entry)
