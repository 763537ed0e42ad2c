"""Continuous batching: which sequences run in the next step, with how many tokens, and who gets preempted.

Each step decodes one token for every running sequence that has finished its prompt, then spends what is left of
the token budget on prompt chunks (chunked prefill): first sequences already part-way through their prompt, then
new arrivals in order. When the page pool runs dry the newest running sequence is preempted: its pages are freed
and it goes back to the front of the queue, to be recomputed from its prompt and the tokens it already produced.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import PageAllocator
from .sequence import Sequence


@dataclass
class ScheduledStep:
    """decode: sequences getting one token. prefill: (sequence, number of prompt tokens computed this step)."""

    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, allocator: PageAllocator, page_size: int, max_num_seqs: int, max_num_batched_tokens: int):
        self.allocator = allocator
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # kept in arrival order
        self.num_preemptions = 0  # since start, over all sequences (for monitoring)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence wherever it is and free its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        for seq in list(self.running):
            if seq in self.running and seq.is_decoding and self._reserve(seq, 1, step):
                step.decode.append(seq)
        budget = self.max_num_batched_tokens - len(step.decode)
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq in self.running and not seq.is_decoding:
                budget -= self._schedule_prefill(seq, budget, step)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # Leave a page per running sequence so admitting this one does not force a preemption next step.
            spare = (self.allocator.num_free - len(self.running)) * self.page_size
            chunk = min(self._fit(seq, min(seq.num_tokens, budget)), max(0, spare))
            if chunk == 0:
                break
            self.waiting.popleft()
            self.running.append(seq)
            self._grow(seq, chunk)
            step.prefill.append((seq, chunk))
            budget -= chunk
        return step

    def reserve_ahead(self, seqs: list[Sequence]) -> bool:
        """Room in each of seqs' pages for one token past those it has computed, for a decode step queued before
        their last tokens are known (Engine.step's async scheduling). Takes free pages only, never preempts:
        False, with nothing allocated, when the free pages do not cover them all."""
        need = sum(max(0, -(-(s.num_computed + 1) // self.page_size) - len(s.pages)) for s in seqs)
        if need > self.allocator.num_free:
            return False
        for seq in seqs:
            self._grow(seq, 1)
        return True

    def _schedule_prefill(self, seq: Sequence, budget: int, step: ScheduledStep) -> int:
        want = min(seq.num_tokens - seq.num_computed, budget)
        while True:
            chunk = self._fit(seq, want)
            if chunk > 0:
                self._grow(seq, chunk)
                step.prefill.append((seq, chunk))
                return chunk
            if not self._preempt_newest(step) or seq not in self.running:
                return 0

    def _reserve(self, seq: Sequence, n: int, step: ScheduledStep) -> bool:
        """Make room for n more tokens of seq, preempting newer sequences as needed; False if seq itself went."""
        while self._fit(seq, n) < n:
            if not self._preempt_newest(step) or seq not in self.running:
                return False
        self._grow(seq, n)
        return True

    def _fit(self, seq: Sequence, want: int) -> int:
        """How many of the next `want` tokens of seq fit in its pages plus the free pages."""
        room = len(seq.pages) * self.page_size - seq.num_computed + self.allocator.num_free * self.page_size
        return max(0, min(want, room))

    def _grow(self, seq: Sequence, n: int) -> None:
        need = -(-(seq.num_computed + n) // self.page_size) - len(seq.pages)
        if need > 0:
            pages = self.allocator.allocate(need)
            assert pages is not None, "_grow called without room"
            seq.pages.extend(pages)

    def _preempt_newest(self, step: ScheduledStep) -> bool:
        """Preempt the most recently arrived running sequence; False when nothing is running."""
        if not self.running:
            return False
        victim = max(self.running, key=lambda s: s.arrival)
        self.running.remove(victim)
        if victim in step.decode:
            step.decode.remove(victim)
        step.prefill = [(s, n) for s, n in step.prefill if s is not victim]
        self._release(victim)
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        step.preempted.append(victim)
        return True

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.pages)
        seq.pages = []
        seq.num_computed = 0
