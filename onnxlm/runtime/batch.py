"""The sequences generated together on one driver: Engine generation and the server's scheduler both
run this, so prefill, speculation, prefix reuse and the KV bookkeeping exist once.

    batch = Batch(model, speculator=NgramDrafter(), prefix_cache=PrefixCache())
    job = batch.admit(seqs, keys)            # a prefill of new sequences (cached prefixes reused)
    while not job.step(): ...                # one chunk per call: decode rounds may run in between
    firsts = batch.join(job)                 # their first tokens (SeqOutput each)
    outs = batch.step()                      # per row, the tokens this round emitted (1 + accepted drafts)
    batch.leave([row for row, s in enumerate(batch.seqs) if s.finish_reason])

Rows keep the driver's order: a row that leaves is replaced by the last one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from . import constraints
from .driver import exact_after, make_rows
from .generate import GenerationParams, SeqOutput, SeqState, Step, check_prompts, new_seq, sample_next
from .prefix import PrefixCache
from .tokenizer import Tokenizer


class Admission:
    """A prefill in flight: its sequences, the driver's job, what each reused from the prefix cache."""

    def __init__(self, batch: Batch, seqs: list[SeqState], keys: list, reuse: list):
        self.seqs, self.keys = seqs, keys
        # identical prompts (a request's n choices) are prefilled once; their rows are copied at join
        first: dict[tuple[int, ...], int] = {}
        self.rows: list[int] = []  # per sequence, the row its prompt is prefilled in
        unique: list[int] = []  # per prefilled row, the first sequence with that prompt
        for i, s in enumerate(seqs):
            key = tuple(s.prompt)
            if key not in first:
                first[key] = len(unique)
                unique.append(i)
            self.rows.append(first[key])
        self.job = batch.rows.start([seqs[i].prompt for i in unique], [reuse[i] for i in unique])
        self.logits = None
        self.seconds = 0.0  # model time spent so far

    @property
    def pending(self) -> int:
        """Prompt positions still to run."""
        return self.job.tokens

    def step(self, chunk: int | None = None) -> bool:
        """Run one chunk (of `chunk` positions when given); True once the prompts are in."""
        if chunk is not None:
            self.job.chunk = chunk
        t0 = time.perf_counter()
        last = self.job.step()
        self.seconds += time.perf_counter() - t0
        if last is not None:
            self.logits = last[self.rows]  # (k, vocab): every sequence its prompt's logits
            if len(set(self.rows)) < len(self.rows):
                self.job.expand(self.rows)
        return self.logits is not None

    def run(self) -> None:
        while not self.step():
            pass

    def free(self) -> None:
        self.job.free()


class Batch:
    """Who is in which row, the first token after prefill, each decode round, and who leaves."""

    def __init__(
        self, model, chunk: int | None = 512, speculator=None, prefix_cache: PrefixCache | None = None
    ):
        self.model = model
        self.rows = make_rows(model, chunk)
        self.speculator = speculator
        self.prefix_cache = prefix_cache if self.rows.supports_reuse else None
        self.seqs: list[SeqState] = []
        self.keys: list = []  # per row, the caller's handle for the sequence (SeqOutput.seq)
        self.forward_s = self.sample_s = 0.0  # the last round's

    def __len__(self) -> int:
        return len(self.seqs)

    def admit(self, seqs: Sequence[SeqState], keys: Sequence | None = None) -> Admission:
        keys = list(range(len(seqs))) if keys is None else list(keys)
        reuse = [None] * len(seqs)
        if self.prefix_cache is not None:
            reuse = [self.prefix_cache.lookup(s.prompt, self.rows.kv_kind(len(s.prompt))) for s in seqs]
            above = getattr(self.rows.model.io, "float_prefill_above", None)
            for s, r in zip(seqs, reuse, strict=True):
                s.cached_tokens = 0 if r is None else r.n
                s.exact_tokens = exact_after(len(s.prompt), r, above)
        return Admission(self, list(seqs), keys, reuse)

    def join(self, adm: Admission) -> list[SeqOutput]:
        """The prefilled sequences join the batch; returns their first tokens (same order)."""
        assert adm.logits is not None, "join an admission whose prefill has finished"
        t0 = time.perf_counter()
        if self.prefix_cache is not None:  # kept with the row's KV when it leaves (PrefixCache.store's ends)
            for i, s in enumerate(adm.seqs):
                s.prompt_logits = adm.logits[i].copy()
        outs = [
            sample_next(s, k, adm.logits[i]) for i, (s, k) in enumerate(zip(adm.seqs, adm.keys, strict=True))
        ]
        self.sample_s = time.perf_counter() - t0
        self.rows.join(adm.job)
        self.seqs += adm.seqs
        self.keys += adm.keys
        if self.speculator is not None:
            self.speculator.join(adm.seqs, self.rows)
        return outs

    def step(self) -> list[list[SeqOutput]]:
        """One decode round for every row: its last token plus any drafts through the model in one
        call; per row the tokens emitted (1 + the drafts the target agreed with)."""
        spec = self.speculator
        t_round = time.perf_counter()
        drafts = spec.propose(self.seqs, self.rows) if spec is not None else [[] for _ in self.seqs]
        tokens = [[s.tokens[-1], *d] for s, d in zip(self.seqs, drafts, strict=True)]
        t0 = time.perf_counter()
        logits = self.rows.decode(tokens)  # (batch, K, vocab)
        self.forward_s = time.perf_counter() - t0
        if spec is not None:
            spec.observe(max(len(t) for t in tokens), self.forward_s)
        t1 = time.perf_counter()
        constraints.fill_masks(self.seqs)  # a draft position's mask is filled when it is reached
        out = []
        for row, (seq, key, draft) in enumerate(zip(self.seqs, self.keys, drafts, strict=True)):
            emitted, agreed = [], 0
            for j in range(len(draft) + 1):
                o = sample_next(seq, key, logits[row, j])
                emitted.append(o)
                if o.finish_reason is not None or j == len(draft) or o.token_id != draft[j]:
                    break
                agreed += 1
            self.rows.rollback(row, len(draft) - agreed)
            if spec is not None:
                spec.feedback(row, len(draft), agreed)
            out.append(emitted)
        self.sample_s = time.perf_counter() - t1
        if spec is not None:
            spec.observe_round(time.perf_counter() - t_round, sum(len(e) for e in out))
        return out

    def leave(self, rows: Sequence[int]) -> None:
        """Remove rows, highest first (the last row, moving in, is never one still to drop); what they
        computed goes to the prefix cache."""
        for row in sorted(set(rows), reverse=True):
            self._remember(row)
            self.rows.drop(row)
            if self.speculator is not None:
                self.speculator.drop(row)
            last_seq, last_key = self.seqs.pop(), self.keys.pop()
            if row < len(self.seqs):
                self.seqs[row], self.keys[row] = last_seq, last_key

    def _remember(self, row: int) -> None:
        if self.prefix_cache is None:
            return
        seq = self.seqs[row]
        held = self.rows.held(row)
        context = (seq.prompt + seq.tokens)[:held]
        if held >= self.prefix_cache.min_tokens:
            ends = {} if seq.prompt_logits is None else {len(seq.prompt): seq.prompt_logits}
            kind = self.rows.kv_kind(held)
            self.prefix_cache.store(context, self.rows.read(row), kind, ends, seq.exact_tokens)

    def free(self) -> None:
        self.rows.free()
        if self.speculator is not None:
            self.speculator.free()
        self.seqs, self.keys = [], []


def generate_steps(
    model,
    tokenizer: Tokenizer | None,
    prompts: Sequence[Sequence[int]],
    params: GenerationParams,
    prefill_chunk: int | None = 512,
    speculator=None,
    prefix_cache: PrefixCache | None = None,
) -> Iterator[Step]:
    """Generate for a batch of token-id prompts; yield one Step per generated position (a round that
    emits several tokens for a row, with speculation, yields as many Steps)."""
    facts = model.facts
    seqs = [new_seq(p, params, tokenizer, facts) for p in check_prompts(prompts, facts)]
    batch = Batch(model, prefill_chunk, speculator, prefix_cache)
    return _run(batch, seqs)  # errors above are raised on the call, not on iteration


def _run(batch: Batch, seqs: list[SeqState]) -> Iterator[Step]:
    try:
        t0 = time.perf_counter()
        adm = batch.admit(seqs)
        adm.run()
        firsts = batch.join(adm)
        wall = time.perf_counter() - t0
        yield Step(firsts, 0, adm.seconds, batch.sample_s, [s.cached_tokens for s in seqs], wall_s=wall)
        index = 1
        while True:
            t0 = time.perf_counter()
            batch.leave([row for row, s in enumerate(batch.seqs) if s.finish_reason is not None])
            if not batch.seqs:
                return
            rounds = batch.step()
            wall = time.perf_counter() - t0
            forward_s, sample_s = batch.forward_s, batch.sample_s
            for j in range(max(len(r) for r in rounds)):
                outs = [r[j] for r in rounds if len(r) > j]
                if j == 1:  # the round's times go to its first step
                    forward_s = sample_s = wall = 0.0
                yield Step(outs, index, forward_s, sample_s, wall_s=wall)
                index += 1
    finally:
        batch.free()
