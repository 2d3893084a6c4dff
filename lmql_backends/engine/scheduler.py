"""The scheduler: decides which sequences run in the next engine step.

New sequences wait in `waiting` (the engine bounds how many it accepts); up to `max_num_seqs` run at once,
first come first served, while the engine's `fits` test (its KV memory bound) lets them. Every step runs the
prompts of newly admitted sequences (prefill, within a token budget) and one batched decode
step for every running sequence that has exactly one token to compute. A preempted sequence goes back
to the front of the queue.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

from .sequence import Sequence


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Limits of the scheduler."""

    max_num_seqs: int = 32
    max_prefill_tokens: int = 4096


@dataclasses.dataclass
class StepPlan:
    prefills: list[Sequence]
    decodes: list[Sequence]


class Scheduler:
    """Holds waiting and running sequences; admits, plans and retires them."""

    def __init__(self, config: SchedulerConfig = SchedulerConfig()):
        self.config = config
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        #: waiting sequences that `fits` held back at the last admission (the first one did not fit)
        self.num_held_back = 0

    def admit(self, fits: Callable[[Sequence], bool] = lambda seq: True) -> list[Sequence]:
        """Move waiting sequences into the running set, in order, while there is a slot and `fits(seq)`."""
        admitted = []
        self.num_held_back = 0
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            if not fits(self.waiting[0]):
                self.num_held_back = len(self.waiting)
                break
            seq = self.waiting.popleft()
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def preempt(self, seq: Sequence) -> None:
        """Put a running sequence back at the front of the queue (it starts again before the others)."""
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def plan(self) -> StepPlan:
        """Decode every sequence with one new token together; prefill the others within budget.

        Prefills are taken in admission order while their new tokens fit in `max_prefill_tokens`;
        the first one always runs (even alone over budget), so no sequence waits forever.
        """
        prefills, decodes, budget = [], [], self.config.max_prefill_tokens
        for seq in self.running:
            if seq.num_new == 1:
                decodes.append(seq)
            elif seq.num_new > 1 and (not prefills or seq.num_new <= budget):
                prefills.append(seq)
                budget -= seq.num_new
        return StepPlan(prefills, decodes)

    def retire(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def find(self, request_id: str) -> Sequence | None:
        for seq in [*self.running, *self.waiting]:
            if seq.request.request_id == request_id:
                return seq
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)


#: a batched prefill pads every prompt to its longest; a prompt joins only if it is at least this
#: share of the longest, so at most half of the batch's positions are padding
MIN_PREFILL_BATCH_SHARE = 0.5


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Indexes of `lengths` grouped for batched prefills: longest first, each group's lengths
    within MIN_PREFILL_BATCH_SHARE of its longest (a group of one runs alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for index in order:
        if groups and lengths[index] >= MIN_PREFILL_BATCH_SHARE * lengths[groups[-1][0]]:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups
