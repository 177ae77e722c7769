"""How one photo's work is shared out over the cores.

One photo runs in two rounds (see Comparator._forward_one): first every backbone group's pass,
then every model's own top and head, each round's items side by side on speed.PerCore's
single-threaded workers. With the full set that leaves a core idle: one core runs the ViT-B/16
(~440 ms) while the other runs both ResNet-152s (~720 ms). A backbone that is a chain of blocks
can be cut in two, its first part in the first round and the rest in the second, and the cuts
are chosen here, from each part's measured time, so that both rounds keep both cores busy. Where
a backbone is cut does not change a single bit of the answer: every part still runs on one
thread, in the same order.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class GroupCost:
    """Seconds one photo costs a backbone group on one thread."""

    backbone_s: list[float]  # each block of its chain in turn, or [the whole pass] if it cannot be cut
    heads_s: list[float]  # each of its models' own top + head

    @property
    def cuttable(self) -> bool:
        # The rest of a cut backbone runs in the second round with its model's head, so only a
        # backbone serving a single model is cut.
        return len(self.backbone_s) > 1 and len(self.heads_s) == 1


def busy_s(costs: list[float], workers: int) -> float:
    """How long `workers` take for items of these costs when each takes the next item as soon as
    it is free, longest first (what PerCore does with items in that order)."""
    loads = [0.0] * max(1, workers)
    for cost in sorted(costs, reverse=True):
        loads[loads.index(min(loads))] += cost
    return max(loads)


def rounds_s(groups: list[GroupCost], cuts: list[int], workers: int) -> float:
    """Estimated seconds of both rounds when group i's chain is cut before block cuts[i]."""
    first = [sum(g.backbone_s[:cut]) for g, cut in zip(groups, cuts)]
    second = [sum(g.backbone_s[cut:]) + head for g, cut in zip(groups, cuts) for head in g.heads_s]
    return busy_s(first, workers) + busy_s(second, workers)


def best_cuts(groups: list[GroupCost], workers: int) -> list[int]:
    """For each group, the block its backbone is cut before (its length: not cut), chosen so that
    both rounds finish soonest.

    First every cuttable backbone is cut after the same time on one core, for each such time (a
    cut group at a time never finds the plan where *both* ResNet-152s are cut); then each cut
    moves on its own while that helps."""
    whole = [len(g.backbone_s) for g in groups]
    if workers < 2 or len(groups) < 2:
        return whole  # a lone item runs on all threads at once: nothing to balance
    budgets = {sum(g.backbone_s[:i]) for g in groups if g.cuttable for i in range(1, len(g.backbone_s))}
    plans = [whole] + [[_cut_within(g, budget) if g.cuttable else len(g.backbone_s) for g in groups]
                       for budget in sorted(budgets)]
    cuts = min(plans, key=lambda plan: rounds_s(groups, plan, workers))
    best, improved = rounds_s(groups, cuts, workers), True
    while improved:
        improved = False
        for i, group in enumerate(groups):
            for cut in range(1, len(group.backbone_s)) if group.cuttable else ():
                trial = cuts[:i] + [cut] + cuts[i + 1:]
                seconds = rounds_s(groups, trial, workers)
                if seconds < best - 1e-9:
                    cuts, best, improved = trial, seconds, True
    return cuts


def _cut_within(group: GroupCost, budget: float) -> int:
    """The last cut whose first part takes at most `budget` (at least one block)."""
    done, cut = 0.0, 1
    for i, seconds in enumerate(group.backbone_s[:-1], start=1):
        done += seconds
        if done > budget + 1e-12:
            break
        cut = i
    return cut


@torch.inference_mode()
def seconds_each(blocks: list[Callable[[torch.Tensor], torch.Tensor]],
                 x: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """Each block's seconds on one thread, applied in turn to `x` (after a warm-up: oneDNN builds
    its kernels on first use), and the chain's output."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds, out = [], x
        for block in blocks:
            start = time.perf_counter()
            out = block(out)
            seconds.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return seconds, out
