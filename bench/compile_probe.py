"""Issue 25's `torch.compile` lever: the real recipe's training step (vision, decoder, loss; backward
through the compiled graph) compiled with inductor against the same step eager, on the real train
split, interleaved rounds in one process. Prints seconds per step and writes
bench/compile_probe_results.json. Nothing here asserts a speed.

    python bench/compile_probe.py [--steps 12 --rounds 2]
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import profile_train as pt  # noqa: E402


def loss_function(trainer: pt.Trainer):
    """The step's forward and loss as one function of the batch's tensors, the part torch.compile gets."""
    from drywall_qa.model import decode, encode_images, pair_activations, resize_logits
    from drywall_qa.training.losses import pair_loss

    def loss(pixel_values, masks, prompt_index, image_index):
        activations = encode_images(trainer.model, pixel_values)
        conditional = trainer.forward.conditionals()[prompt_index]
        logits = decode(trainer.model, pair_activations(activations, image_index), conditional, chunk_pairs=None)
        logits = resize_logits(logits.float(), tuple(masks.shape[-2:]))
        return pair_loss(logits, masks, prompt_index, trainer.train_set, trainer.config)

    return loss


def train_step(trainer: pt.Trainer, loss_of) -> None:
    """One optimizer step the way `training.loop.train_epoch` takes it."""
    import torch

    trainer.model.train()
    batch = trainer.next_batch()
    loss = loss_of(batch["pixel_values"], batch["masks"], batch["prompt_index"], batch["image_index"])
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.optimizer.param_groups[0]["params"], trainer.config.train.grad_clip)
    trainer.optimizer.step()
    trainer.scheduler.step()
    if trainer.average is not None:
        trainer.average.update_parameters(trainer.model)


def measure(steps: int, rounds: int, workspace: Path) -> dict:
    from drywall_qa.numerics import configure_cpu_numerics

    params = pt.recipe_params(2)
    configure_cpu_numerics(params["cpu_numerics"])  # before torch loads, as the recipe runs
    import torch

    torch.set_num_threads(2)
    workspace.mkdir(parents=True, exist_ok=True)
    manifest = pt.prepare_real_split(workspace, REPO.parent / "shared")
    trainers = {name: pt.Trainer(params, {}, manifest, workspace) for name in ("eager", "compiled")}
    for index in range(len(trainers["eager"].train_set)):  # photos decoded once, as epoch 1 does for later ones
        trainers["eager"].train_set._load_resized(index)
    trainers["compiled"].train_set._resized = trainers["eager"].train_set._resized
    losses = {
        "eager": loss_function(trainers["eager"]),
        "compiled": torch.compile(loss_function(trainers["compiled"])),
    }
    warm_up = {}
    for name, trainer in trainers.items():
        started = time.perf_counter()
        for _ in range(3):
            train_step(trainer, losses[name])
        warm_up[name] = round(time.perf_counter() - started, 1)  # the compiled path's includes compiling
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for _round in range(rounds):
        for name, trainer in trainers.items():
            started = time.perf_counter()
            for _ in range(steps):
                train_step(trainer, losses[name])
            seconds[name].append(round((time.perf_counter() - started) / steps, 4))
    return {
        "steps_per_round": steps,
        "rounds": rounds,
        "warm_up_seconds": warm_up,
        "seconds_per_step": seconds,
        "compiled_over_eager": round(sum(seconds["compiled"]) / sum(seconds["eager"]), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/drywall-qa-profile-real"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "compile_probe_results.json")
    args = parser.parse_args()
    results = measure(args.steps, args.rounds, args.workspace)
    from drywall_qa.contracts.atomic import write_json_atomic

    write_json_atomic(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
