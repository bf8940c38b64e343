"""The training losses and the per-pair scores validation reports.

Loss = bce_weight * BCE + dice_weight * soft Dice (+ cldice_weight * soft clDice on the prompts of
`cldice_datasets`, the thin structures); params `train.*_weight`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from drywall_qa.data import SegmentationDataset
from drywall_qa.training.config import TrainConfig, TrainConfigError


def segmentation_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    bce_weight: float,
    dice_weight: float,
    thin: torch.Tensor | None = None,
    cldice_weight: float = 0.0,
) -> torch.Tensor:
    """bce_weight * mean BCE over all pixels + dice_weight * mean soft Dice loss over the pairs whose
    mask is not empty (+ cldice_weight * mean soft clDice loss over the non-empty pairs that `thin`
    marks).

    Dice is left out for empty masks: there it is ~1 for any prediction short of exactly zero, and
    with negative prompts (half the pairs) it drags every logit down, prompt-blind, before the model
    has learnt to tell prompts apart; training then sits at "predict nothing". BCE covers empty masks.
    clDice (Shit et al. 2021) compares soft skeletons: it rewards a crack traced end to end over a
    thick blob on part of it, which area overlap alone hardly tells apart for a 2 px line.
    """
    logits = logits.float()
    loss = bce_weight * torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
    targets = masks.flatten(1)
    non_empty = targets.sum(1) > 0
    if not non_empty.any():
        return loss
    probs = torch.sigmoid(logits).flatten(1)[non_empty]
    targets = targets[non_empty]
    dice = 1 - (2 * (probs * targets).sum(1) + 1) / (probs.sum(1) + targets.sum(1) + 1)
    loss = loss + dice_weight * dice.mean()
    selected = non_empty & thin if cldice_weight > 0 and thin is not None else None
    if selected is not None and selected.any():
        loss = loss + cldice_weight * soft_cldice_loss(logits[selected].unsqueeze(1), masks[selected].unsqueeze(1))
    return loss


def soft_cldice_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """MONAI's soft clDice loss of `[N, 1, H, W]` logits against binary masks, averaged over the pairs."""
    # imported here: MONAI takes seconds to import, and only runs with train.cldice_weight > 0 need it
    from monai.losses import SoftclDiceLoss

    return SoftclDiceLoss(iter_=3, sigmoid=True)(logits, masks)


def thin_prompts(config: TrainConfig, prompts_of_dataset: dict[str, list[str]]) -> list[str]:
    """The prompts clDice applies to: those of `config.train.cldice_datasets` (none while it is off)."""
    if config.train.cldice_weight <= 0:
        return []
    unknown = sorted(set(config.train.cldice_datasets) - set(prompts_of_dataset))
    if unknown:
        raise TrainConfigError(
            f"train.cldice_datasets names {unknown}, which the manifest lacks (datasets: {sorted(prompts_of_dataset)})"
        )
    return [prompt for name in config.train.cldice_datasets for prompt in prompts_of_dataset[name]]


def thin_pairs(prompt_index: torch.Tensor, dataset: SegmentationDataset, config: TrainConfig) -> torch.Tensor | None:
    """Which pairs (by `prompt_index` into `dataset.prompt_list`) clDice applies to; None when it is off."""
    prompts = thin_prompts(config, dataset.prompts_of_dataset)
    if not prompts:
        return None
    thin = torch.tensor([dataset.prompt_index[prompt] for prompt in prompts], dtype=prompt_index.dtype)
    return torch.isin(prompt_index, thin.to(prompt_index.device))


def pair_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    prompt_index: torch.Tensor,
    dataset: SegmentationDataset,
    config: TrainConfig,
    side_logits: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """`segmentation_loss` of a batch's pairs with the config's weights, plus `train.deep_supervision`
    x the mean BCE + Dice of the skip decoder's side logits (resized to the masks' size)."""
    thin = thin_pairs(prompt_index.to(logits.device), dataset, config)
    train = config.train
    loss = segmentation_loss(logits, masks, train.bce_weight, train.dice_weight, thin, train.cldice_weight)
    for side in side_logits:
        side_loss = segmentation_loss(side, masks, train.bce_weight, train.dice_weight)
        loss = loss + train.deep_supervision / len(side_logits) * side_loss
    return loss


def pair_scores(logits: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair IoU and Dice of `sigmoid(logits) >= threshold` against binary masks; empty vs empty = 1."""
    predicted = (torch.sigmoid(logits.float()) >= threshold).flatten(1)  # metrics.binarize's rule
    truth = masks.flatten(1) > 0.5
    intersection = (predicted & truth).sum(1).float()
    union = (predicted | truth).sum(1).float()
    total = predicted.sum(1).float() + truth.sum(1).float()
    iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
    dice = torch.where(total > 0, 2 * intersection / total.clamp(min=1), torch.ones_like(total))
    return iou, dice
