"""Grouped, seeded train/val/test split of the converted images -> the (image, prompt) manifest.

Why Roboflow's own split folders are merged and re-split: Roboflow makes augmented copies of a
source image (`<stem>_<ext>.rf.<hash>`) and the real exports put copies of one source image in
different folders (in drywall-join-detect most valid/test sources also occur in train), so its
folders leak. Here every copy of a source image (`group`, from `naming.source_group`) lands in one
split, per dataset, with the image counts as close to the requested fractions as the group sizes
allow.

Algorithm (deterministic for a seed): for each dataset, `shuffles` seeded permutations of the
groups are each assigned greedily, group by group, to the split furthest below its target image
count (a split still empty takes the group when only as many groups remain as there are empty
splits, so every split gets a group once there are 3); the permutation whose image counts deviate
least from the targets wins (ties: the earliest). Shuffling rather than sorting by size keeps large
groups from always landing in train.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from drywall_qa.contracts.atomic import write_json_atomic
from drywall_qa.contracts.manifest import SPLITS, read_images_csv, write_manifest
from drywall_qa.contracts.naming import mask_file_name
from drywall_qa.errors import DrywallQAError


class SplitError(DrywallQAError):
    """The split cannot be made from this input or these parameters; the stage prints it and exits 1."""


def check_fractions(fractions: dict[str, float]) -> dict[str, float]:
    """The three split fractions, each > 0, summing to 1."""
    missing = [name for name in SPLITS if name not in fractions]
    if missing:
        raise SplitError(f"split fractions lack {missing}: need train, val and test")
    values = {name: float(fractions[name]) for name in SPLITS}
    if any(value <= 0 for value in values.values()):
        raise SplitError(f"every split fraction must be > 0, got {values}")
    if abs(sum(values.values()) - 1.0) > 1e-6:
        raise SplitError(f"split fractions must sum to 1, got {sum(values.values()):.6f} from {values}")
    return values


def assign_groups(
    group_sizes: dict[str, int], fractions: dict[str, float], seed: int, dataset: str, shuffles: int
) -> dict[str, str]:
    """Map each group to a split (see the module docstring); needs at least 3 groups."""
    if len(group_sizes) < len(SPLITS):
        raise SplitError(
            f"dataset {dataset!r} has {len(group_sizes)} source image group(s); a grouped "
            f"train/val/test split needs at least {len(SPLITS)}"
        )
    if shuffles < 1:
        raise SplitError(f"split.shuffles must be >= 1, got {shuffles}")
    total = sum(group_sizes.values())
    targets = {name: fractions[name] * total for name in SPLITS}
    # The dataset name enters the seed so two datasets with the same group names shuffle differently.
    rng = np.random.default_rng([seed, zlib.crc32(dataset.encode("utf-8"))])
    groups = sorted(group_sizes)
    best: tuple[float, dict[str, str]] | None = None
    for _ in range(shuffles):
        order = [groups[i] for i in rng.permutation(len(groups))]
        assignment = _greedy_assign(order, group_sizes, targets)
        counts = dict.fromkeys(SPLITS, 0)
        for group, name in assignment.items():
            counts[name] += group_sizes[group]
        deviation = sum(abs(counts[name] - targets[name]) for name in SPLITS)
        if best is None or deviation < best[0]:
            best = (deviation, assignment)
    return best[1]


def _greedy_assign(order: list[str], group_sizes: dict[str, int], targets: dict[str, float]) -> dict[str, str]:
    counts = dict.fromkeys(SPLITS, 0)
    n_groups = dict.fromkeys(SPLITS, 0)
    assignment: dict[str, str] = {}
    for position, group in enumerate(order):
        remaining = len(order) - position
        empty = [name for name in SPLITS if n_groups[name] == 0]
        candidates = empty if remaining <= len(empty) else list(SPLITS)
        # max() keeps the first of equal deficits, so ties go train, val, test.
        chosen = max(candidates, key=lambda name: targets[name] - counts[name])
        assignment[group] = chosen
        counts[chosen] += group_sizes[group]
        n_groups[chosen] += 1
    return assignment


def build_manifest(
    images: list[dict],
    prompts: dict[str, list[str]],
    fractions: dict[str, float],
    seed: int,
    masks_dir: str = "data/masks",
    shuffles: int = 64,
) -> tuple[list[dict], dict]:
    """images.csv rows -> (sorted manifest rows, split statistics)."""
    fractions = check_fractions(fractions)
    datasets = sorted({row["dataset"] for row in images})
    unknown = sorted(set(datasets) - set(prompts))
    if unknown:
        raise SplitError(f"images.csv has dataset(s) {unknown} with no prompts in params.yaml")
    absent = sorted(set(prompts) - set(datasets))
    if absent:
        raise SplitError(f"no converted image for dataset(s) {absent} (check metrics/conversion.json)")

    manifest: list[dict] = []
    stats: dict = {"seed": seed, "fractions": fractions, "shuffles": shuffles, "datasets": {}}
    for dataset in datasets:
        rows = [row for row in images if row["dataset"] == dataset]
        if not prompts[dataset]:
            raise SplitError(f"dataset {dataset!r} has no prompts in params.yaml")
        group_sizes: dict[str, int] = defaultdict(int)
        source_splits: dict[str, set] = defaultdict(set)
        for row in rows:
            group_sizes[row["group"]] += 1
            source_splits[row["group"]].add(row["source_split"])
        assignment = assign_groups(dict(group_sizes), fractions, seed, dataset, shuffles)
        for row in rows:
            for prompt in prompts[dataset]:
                manifest.append(
                    {
                        "dataset": dataset,
                        "split": assignment[row["group"]],
                        "image_id": row["image_id"],
                        "image_path": row["image_path"],
                        "mask_path": f"{masks_dir}/{dataset}/{mask_file_name(row['image_id'], prompt)}",
                        "prompt": prompt,
                        "group": row["group"],
                        "width": row["width"],
                        "height": row["height"],
                        "source_split": row["source_split"],
                    }
                )
        stats["datasets"][dataset] = _dataset_stats(rows, assignment, len(prompts[dataset]), fractions)
        # Evidence for re-splitting: source groups that Roboflow spread over more than one folder.
        stats["datasets"][dataset]["groups_across_source_splits"] = sum(len(s) > 1 for s in source_splits.values())

    manifest.sort(key=lambda r: (r["dataset"], r["split"], r["image_id"], r["prompt"]))
    check_no_group_crosses_splits(manifest)
    stats["totals"] = {
        name: {key: sum(d[name][key] for d in stats["datasets"].values()) for key in ("images", "groups", "pairs")}
        for name in SPLITS
    }
    return manifest, stats


def _dataset_stats(rows: list[dict], assignment: dict[str, str], n_prompts: int, fractions: dict[str, float]) -> dict:
    stats: dict = {}
    for name in SPLITS:
        images = sum(1 for row in rows if assignment[row["group"]] == name)
        groups = sum(1 for split in assignment.values() if split == name)
        stats[name] = {
            "images": images,
            "groups": groups,
            "pairs": images * n_prompts,
            "image_fraction": round(images / len(rows), 4),
            "target_fraction": fractions[name],
        }
    return stats


def check_no_group_crosses_splits(manifest: list[dict]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for row in manifest:
        key = (row["dataset"], row["group"])
        if seen.setdefault(key, row["split"]) != row["split"]:
            raise SplitError(f"group {key} is in both {seen[key]} and {row['split']}: the split leaks")


def check_masks_exist(manifest: list[dict], repo_root: Path) -> None:
    missing = [row["mask_path"] for row in manifest if not (repo_root / row["mask_path"]).is_file()]
    if missing:
        raise SplitError(
            f"{len(missing)} mask file(s) named by the manifest do not exist, e.g. {missing[:3]}; "
            "were the prompts changed without re-running convert?"
        )


def write_split(
    images_csv: str | Path,
    prompts: dict[str, list[str]],
    fractions: dict[str, float],
    seed: int,
    manifest_path: str | Path,
    stats_path: str | Path,
    masks_dir: str = "data/masks",
    repo_root: str | Path = ".",
    shuffles: int = 64,
) -> dict:
    """Read images.csv, split, check every mask exists, write the manifest and split.json atomically."""
    images = read_images_csv(images_csv)
    manifest, stats = build_manifest(images, prompts, fractions, seed, masks_dir, shuffles)
    check_masks_exist(manifest, Path(repo_root))
    write_manifest(manifest_path, manifest)
    write_json_atomic(stats_path, stats)
    return stats
