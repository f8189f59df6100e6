"""A short toy training in one process, or in each process of a torchrun job, that writes every
process's weights and options (tests/test_distributed.py compares them).

    python tests/ddp_toy_training.py OUT            # one process: OUT/rank0.safetensors
    torchrun --nproc_per_node=2 tests/ddp_toy_training.py OUT   # OUT/rank0…, OUT/rank1…
"""
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdetr_agf import distributed  # noqa: E402
from mdetr_agf.training import TrainConfig, train  # noqa: E402


def main(out: Path) -> None:
    group = distributed.join("cpu")
    try:
        config = TrainConfig(steps=3, seed=0, batch_size=4, warmup=2, captions_per_image=2, attribute_loss=1.0,
                             scene_seeds=range(16), threads=1, processes=group.world_size)
        result = train(config, progress=False)
        state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
        save_file(state, str(out / f"rank{group.rank}.safetensors"),
                  metadata={"options": json.dumps(result.options), "losses": json.dumps(result.losses)})
    finally:
        distributed.leave(group)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
