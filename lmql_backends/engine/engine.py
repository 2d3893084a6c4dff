"""The engine: one thread owns the model and runs every request of every backend.

Data flows one way: `submit` puts a request in the inbox → the scheduler admits and plans →
the runner computes → each sequence's outputs go to its consumer through `emit`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable

import torch

from ..errors import (
    ConstraintError, ContextLengthError, EngineError, InvalidRequestError, KVCacheFullError, KVCacheLimitError,
    OverloadedError, RequestCancelledError,
)
from .delivery import Mailboxes
from .kv_budget import KVBudget, KVMemory, check_limit, kv_bytes_per_token
from .prefix_cache import PrefixCache
from ..loader import MATMUL_CHOICES, MODEL_IMPLS, check_choice
from .runner import SHARE_FROM_TOKENS, ModelRunner
from ..sampling import select_token, top_logprobs
from .sampling import Choice, apply_processors, choose_greedy_rows
from .scheduler import Scheduler, SchedulerConfig, length_groups
from .sequence import ErrorOutput, Output, PromptOutput, Request, Sequence, TokenOutput
from .streams import OutputStreams

log = logging.getLogger("lmql_backends.engine")

STATS_WINDOW_SECONDS = 10.0
#: how often, while sequences run, the KV memory figures of /metrics are measured again (seconds)
KV_MEASURE_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine settings (the server flags --cache-tokens, --max-num-seqs, --max-queue, --kv-cache-bytes)."""

    cache_tokens: int = 32768
    max_num_seqs: int = 32
    max_queue: int = 256
    max_prefill_tokens: int = 4096
    use_prefix_cache: bool = True
    #: torch intra-op threads of the engine thread; None: torch's default
    num_threads: int | None = None
    #: "auto" (the native GPT-2 forward where it applies), "native" or "transformers" (see runner.make_forward)
    model_impl: str = "auto"
    #: the native forward's matrix-product kernels: "auto" (timed at start), "blas" or "onednn" (see linear_kernels)
    matmul: str = "auto"
    #: prompts without a cached past that arrive together run in one forward (see runner.prefill_batch)
    batch_prefills: bool = True
    #: the most KV memory (bytes) running sequences and the prefix cache hold together; None: no bound
    #: beyond --cache-tokens and --max-num-seqs (see kv_budget)
    kv_cache_bytes: int | None = None

    def __post_init__(self):
        check_limit(self.kv_cache_bytes)
        check_choice("model_impl", self.model_impl, MODEL_IMPLS)
        check_choice("matmul", self.matmul, MATMUL_CHOICES)
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise InvalidRequestError(f"num_threads must be an integer >= 1 or None, got {self.num_threads!r}", "num_threads")


class TokenRate:
    """Tokens per second over the last STATS_WINDOW_SECONDS (added on one thread, read on any)."""

    def __init__(self):
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, num_tokens: int) -> None:
        now = time.monotonic()
        self._recent.append((now, num_tokens))
        while self._recent and self._recent[0][0] < now - STATS_WINDOW_SECONDS:
            self._recent.popleft()

    def per_second(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if t >= now - STATS_WINDOW_SECONDS]
        span = (now - recent[0][0]) if len(recent) > 1 else 0.0
        return sum(n for _, n in recent) / span if span > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot of what the engine is doing (served at /metrics)."""

    tokens_per_second: float
    num_generated_tokens: int
    num_prompt_tokens: int
    num_cached_prompt_tokens: int
    num_steps: int
    last_batch_size: int
    num_running: int
    num_waiting: int
    cache_hit_rate: float
    cache_tokens: int
    num_failed_requests: int
    num_threads: int
    is_native_forward: bool
    #: linear layers that run on oneDNN for some batch size (see linear_kernels; 0 with matmul "blas")
    num_onednn_linears: int
    #: bytes of the weight copies packed for oneDNN that matmul "auto" chose to keep (see linear_kernels)
    packed_weight_bytes: int = 0
    # KV memory (see kv_budget.KVMemory; measured at most KV_MEASURE_SECONDS ago; a shared column counts once)
    kv_bytes_per_token: int = 0
    #: the --kv-cache-bytes bound (0: none)
    kv_limit_bytes: int = 0
    kv_used_bytes: int = 0
    kv_used_tokens: int = 0
    kv_shared_bytes: int = 0
    kv_private_bytes: int = 0
    kv_prefix_cache_bytes: int = 0
    kv_total_bytes: int = 0
    kv_reserved_bytes: int = 0
    kv_free_bytes: int = 0
    #: waiting requests held back because their KV does not fit under the bound yet
    num_waiting_for_kv: int = 0
    #: running sequences preempted (KV dropped, recomputed later) because KV outgrew the bound
    num_preemptions: int = 0


class Engine(OutputStreams):
    """Continuous-batching inference over one loaded model, with a prefix KV cache."""

    def __init__(self, loaded, config: EngineConfig = EngineConfig(), after_step: Callable[[], None] | None = None):
        """`after_step` runs on the engine thread after each step (the engine process sends the step's outputs)."""
        self.loaded = loaded
        self._after_step = after_step or (lambda: None)
        self.config = config
        self.runner = ModelRunner(loaded.model, config.model_impl)
        if config.matmul != "auto":  # nothing to time: set now, so that a bad choice fails here
            self.runner.choose_linear_kernels(config.matmul, config.max_num_seqs)
        self.cache = PrefixCache(config.cache_tokens)
        self.kv_budget = KVBudget(
            config.kv_cache_bytes, kv_bytes_per_token(loaded.model), loaded.context_length, self.cache,
            SHARE_FROM_TOKENS if self.runner.shares_prefixes else None,
        )
        self._kv_memory, self._kv_measured = KVMemory(), (0.0, None)  # the last measure: (when, of what)
        self._num_freed = 0  # sequences retired or preempted so far (each may free KV memory)
        self._held_back: tuple[Sequence, int] | None = None  # the sequence that did not fit, and _num_freed then
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_prefill_tokens))
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._num_pending = 0
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._counters = collections.Counter()
        self._rate = TokenRate()
        self._last_batch_size = 0
        self.num_threads: int | None = None  # set by the engine thread when it starts
        self._is_ready = threading.Event()  # set once the engine thread has tuned itself to the machine
        self._mailboxes = Mailboxes()  # how outputs reach consumers' event loops (see emitter)

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmql-backends-engine", daemon=True)
            self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the started engine thread has chosen its thread count and kernels."""
        return self._is_ready.wait(timeout)

    def stop(self) -> None:
        """Cancel everything in flight and stop the engine thread."""
        self._stopped.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._cancel_all()  # requests that raced with stop() are cancelled, never left hanging

    # ---- requests --------------------------------------------------------------------
    def submit(self, request: Request, emit: Callable[[Output], None]) -> None:
        """Enqueue `request`, which its caller validated (see `check_request`); its outputs are passed
        to `emit` (any thread). OverloadedError when the engine is at capacity."""
        self._enqueue(Sequence(request, emit), is_checked=False)

    def submit_checked(self, request: Request, emit: Callable[[Output], None]) -> None:
        """Enqueue a request its caller has validated and counted against the capacity (the engine
        process's handle, in the server process, whose count is the one that answers 429)."""
        self._enqueue(Sequence(request, emit), is_checked=True)

    def _enqueue(self, seq: Sequence, is_checked: bool) -> None:
        if self._stopped.is_set():
            raise RequestCancelledError("the engine is shutting down")
        with self._pending_lock:
            if not is_checked:
                check_capacity(self._num_pending, self.config, is_waiting_for_kv=self.scheduler.num_held_back > 0)
            self._num_pending += 1
        self.start()
        self._inbox.put(("add", seq))

    def abort(self, request_id: str) -> None:
        """Cancel a request at the next step (its consumer went away)."""
        self._inbox.put(("abort", request_id))

    @property
    def is_alive(self) -> bool:
        """Whether the engine takes requests (False once stopped)."""
        return not self._stopped.is_set()

    @property
    def num_pending(self) -> int:
        """Counted requests submitted and not yet finished (queued or running)."""
        return self._num_pending

    # ---- the engine thread -----------------------------------------------------------
    def _loop(self) -> None:
        self._set_num_threads()
        self._choose_linear_kernels()
        self._is_ready.set()
        while not self._stopped.is_set():
            self._drain_inbox(block=not self.scheduler.has_work)
            if self._stopped.is_set():
                break
            try:
                self._step()
            except Exception as exc:  # never let the engine thread die
                log.exception("engine step failed")
                self._fail(list(self.scheduler.running), exc)
            self._measure_kv_if_due()
            self._after_step()
        self._cancel_all()
        self._after_step()

    def _set_num_threads(self) -> None:
        """Intra-op threads for this thread only (torch keeps a count per thread)."""
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)
        self.num_threads = torch.get_num_threads()
        log.debug("engine thread uses %d torch thread(s)", self.num_threads)

    def _choose_linear_kernels(self) -> None:
        """Time the matrix-product kernels on this thread's thread count (matmul "auto" only)."""
        if self.config.matmul != "auto":
            return
        try:
            choices = self.runner.choose_linear_kernels("auto", self.config.max_num_seqs)
        except Exception:  # timing is an optimisation: never let it keep the engine from running
            log.exception("could not time the matrix-product kernels; keeping torch's BLAS")
            return
        for (shape, *_), choice in choices.items():
            log.debug("linear %s kernels by rows: %s", "x".join(map(str, shape)), choice.describe())
        if self.runner.packed_weight_bytes:
            log.info("matmul auto keeps %.0f MB of weights packed for oneDNN (faster decode steps; --matmul blas "
                     "keeps none)", self.runner.packed_weight_bytes / 2 ** 20)

    def _cancel_all(self) -> None:
        """Fail every queued and running request with RequestCancelledError (at shutdown)."""
        self._drain_inbox(block=False)
        self._fail([*self.scheduler.running, *self.scheduler.waiting], RequestCancelledError("the engine stopped"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload) -> None:
        if kind == "add":
            try:
                self.kv_budget.check_fits_alone(payload.request)
            except KVCacheLimitError as exc:  # it could never run: refused now, not after a wait
                return self._fail([payload], exc)
            self.scheduler.waiting.append(payload)
        elif kind == "abort":
            seq = self.scheduler.find(payload)
            if seq is not None:
                seq.is_aborted = True
                self._retire(seq)

    def _step(self) -> None:
        self.scheduler.admit(self._attach_if_fits)
        plan = self.scheduler.plan()
        self._counters["steps"] += 1
        self._run_prefills(plan.prefills)
        if plan.decodes:
            self._run_decode(plan.decodes)
        for seq in self.kv_budget.to_preempt(self.scheduler.running):
            self._preempt(seq)

    def _attach_if_fits(self, seq: Sequence) -> bool:
        """Attach the cached prefix of `seq` if its KV fits under the bound beside the running sequences.
        A sequence that did not fit is tried again once a sequence has finished or was preempted."""
        if self._held_back == (seq, self._num_freed):
            return False
        self._attach_prefix(seq)
        if self.kv_budget.admits(seq, self.scheduler.running):
            return True
        seq.kv, seq.num_computed, seq.num_cached = None, 0, 0
        self._held_back = (seq, self._num_freed)
        return False

    def _preempt(self, seq: Sequence) -> None:
        """Drop a running sequence's KV and queue it again first: it is recomputed, then continues."""
        log.debug("KV over the bound: preempting request %s", seq.request.request_id)
        seq.kv, seq.num_computed, seq.num_cached = None, 0, 0
        self.scheduler.preempt(seq)
        self._counters["preemptions"] += 1
        self._num_freed += 1

    def _attach_prefix(self, seq: Sequence) -> None:
        """Reuse the longest cached prefix; always leave at least one token to compute."""
        request = seq.request
        limit = len(seq.ids) - 1
        if request.score_from is not None:
            limit = min(limit, request.score_from - 1)
        if not self.config.use_prefix_cache or limit <= 0:
            return
        hit = self.cache.lookup(seq.ids, limit)
        seq.kv, seq.num_computed, seq.num_cached = hit.kv, hit.num_tokens, hit.num_tokens

    def _run_prefills(self, seqs: list[Sequence]) -> None:
        """Prompts with at most a short cached past (and not scored) in batches of similar lengths,
        the rest one by one."""
        batchable = [seq for seq in seqs if is_batchable_prefill(seq)] if self.config.batch_prefills else []
        for seq in seqs:
            if seq not in batchable:
                self._run_prefill(seq)
        for group in length_groups([len(seq.ids) for seq in batchable]):
            if len(group) == 1:
                self._run_prefill(batchable[group[0]])
            else:
                self._run_prefill_batch([batchable[i] for i in group])

    def _run_prefill_batch(self, seqs: list[Sequence]) -> None:
        for seq in seqs:  # a short cached prefix is computed again with the batch, not copied in
            seq.kv, seq.num_computed, seq.num_cached = None, 0, 0
        try:
            logits, kvs = self.runner.prefill_batch([seq.new_ids() for seq in seqs])
        except Exception as exc:
            log.exception("prefill failed")
            return self._fail(seqs, exc)
        for row, seq in enumerate(seqs):
            self._after_forward(seq, kvs[row], logits[row:row + 1])

    def _run_prefill(self, seq: Sequence) -> None:
        try:
            logits, kv = self.runner.prefill(seq.new_ids(), seq.kv, seq.num_computed, wants_all_logits(seq))
        except Exception as exc:
            log.exception("prefill failed")
            return self._fail([seq], exc)
        self._after_forward(seq, kv, logits)

    def _run_decode(self, seqs: list[Sequence]) -> None:
        tokens = [seq.ids[-1] for seq in seqs]
        try:
            logits, kvs = self.runner.decode(tokens, [s.kv for s in seqs], [s.num_computed for s in seqs])
        except Exception as exc:
            log.exception("decode step failed")
            return self._fail(seqs, exc)
        self._last_batch_size = len(seqs)
        choices = self._greedy_choices(seqs, logits)
        for row, seq in enumerate(seqs):
            self._after_forward(seq, kvs[row], logits[row:row + 1], choices[row])

    def _greedy_choices(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Choice | None]:
        """The tokens of a batch's greedy sequences chosen together (None: the sequence chooses alone)."""
        rows = [row for row, seq in enumerate(seqs) if seq.request.sampling.is_greedy and not seq.request.processors]
        choices: list[Choice | None] = [None] * len(seqs)
        if len(rows) > 1:
            for row, choice in zip(rows, choose_greedy_rows(logits[rows] if len(rows) < len(seqs) else logits)):
                choices[row] = choice
        return choices

    def _after_forward(self, seq: Sequence, kv, logits: torch.Tensor, choice: Choice | None = None) -> None:
        first_forward = seq.num_generated == 0 and seq.num_computed < len(seq.request.prompt_ids)
        self._counters["prompt_tokens" if first_forward else "decode_tokens"] += seq.num_new
        seq.kv, seq.num_computed = kv, len(seq.ids)
        try:
            if first_forward:
                self._emit_prompt(seq, logits)
            if not seq.is_finished:
                self._emit_token(seq, logits[-1], choice)
        except Exception as exc:
            log.info("request %s failed: %s", seq.request.request_id, exc)
            self._fail([seq], exc)

    def _emit_prompt(self, seq: Sequence, logits: torch.Tensor) -> None:
        request = seq.request
        self._counters["cached_tokens"] += seq.num_cached
        out = PromptOutput(len(request.prompt_ids), seq.num_cached)
        if request.return_logits:
            out.logits = logits[-1].clone()
        if request.score_from is not None:
            out.prompt_logprobs, out.prompt_top_logprobs = score_prompt(seq, logits)
        if request.max_tokens == 0:
            out.finish_reason = "length"
            seq.is_finished = True
        seq.emit(out)
        if seq.is_finished:
            self._retire(seq)

    def _emit_token(self, seq: Sequence, logits: torch.Tensor, choice: Choice | None = None) -> None:
        request = seq.request
        if choice is None:
            processed = apply_processors(request.processors, seq.ids, logits)
            token, logprobs = select_token(processed, request.sampling, len(seq.ids))
            logprob = float(logprobs[token])
        else:
            token, logprob, logprobs = choice.token_id, choice.logprob, choice.logprobs
        seq.ids.append(token)
        seq.num_generated += 1
        self._count_generated(1)
        reason = finish_reason(seq, token, self.loaded.context_length)
        seq.is_finished = reason is not None
        top = top_logprobs(logprobs, request.sampling.num_top_logprobs)
        seq.emit(TokenOutput(token, logprob, top, reason))
        if seq.is_finished:
            self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        self.scheduler.retire(seq)
        self._num_freed += 1
        with self._pending_lock:
            self._num_pending -= 1
        if not seq.is_aborted and seq.kv is not None and self.config.use_prefix_cache:
            self.cache.insert(seq.ids[:seq.num_computed], seq.kv)
            self.kv_budget.cache_changed()
        seq.kv = None

    def _fail(self, seqs: list[Sequence], exc: Exception) -> None:
        error = exc if isinstance(exc, (EngineError, InvalidRequestError)) or is_user_error(exc) else EngineError(
            f"the engine failed while running this request: {type(exc).__name__}: {exc}"
        )
        for seq in seqs:
            if seq.is_finished:
                continue
            seq.is_finished = seq.is_aborted = True
            self._counters["failed"] += 1
            self._retire(seq)
            try:
                seq.emit(ErrorOutput(error))
            except Exception:  # a broken consumer must not keep the others from their errors
                log.exception("could not deliver the error of request %s", seq.request.request_id)

    def _count_generated(self, n: int) -> None:
        self._counters["generated"] += n
        self._rate.add(n)

    # ---- observability ---------------------------------------------------------------
    def _measure_kv_if_due(self) -> None:
        """Measure KV memory when sequences came or went, else at most every KV_MEASURE_SECONDS (engine thread)."""
        scheduler, (measured_at, measured_of) = self.scheduler, self._kv_measured
        of = (len(scheduler.running), len(scheduler.waiting), self._counters["preemptions"])
        now = time.monotonic()
        if of != measured_of or now - measured_at >= KV_MEASURE_SECONDS:
            self._kv_memory, self._kv_measured = self.kv_budget.measure(scheduler.running), (now, of)

    def stats(self) -> EngineStats:
        memory, budget = self._kv_memory, self.kv_budget
        return EngineStats(
            tokens_per_second=self._rate.per_second(),
            num_generated_tokens=self._counters["generated"],
            num_prompt_tokens=self._counters["prompt_tokens"],
            num_cached_prompt_tokens=self._counters["cached_tokens"],
            num_steps=self._counters["steps"],
            last_batch_size=self._last_batch_size,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            cache_hit_rate=self.cache.hit_rate,
            cache_tokens=self.cache.num_tokens,
            num_failed_requests=self._counters["failed"],
            num_threads=self.num_threads or 0,
            is_native_forward=self.runner.is_native,
            num_onednn_linears=self.runner.num_onednn_linears,
            packed_weight_bytes=self.runner.packed_weight_bytes,
            kv_bytes_per_token=budget.bytes_per_token,
            kv_limit_bytes=budget.limit_bytes or 0,
            kv_used_bytes=memory.used_bytes,
            kv_used_tokens=memory.used_bytes // budget.bytes_per_token,
            kv_shared_bytes=memory.shared_bytes,
            kv_private_bytes=memory.private_bytes,
            kv_prefix_cache_bytes=memory.prefix_cache_bytes,
            kv_total_bytes=memory.total_bytes,
            kv_reserved_bytes=memory.reserved_bytes,
            kv_free_bytes=budget.free_bytes(memory),
            num_waiting_for_kv=self.scheduler.num_held_back,
            num_preemptions=self._counters["preemptions"],
        )


def are_plain_ints(values) -> bool:
    """Whether every entry is exactly an int (not a bool or other subclass), checked at C speed."""
    return set(map(type, values)) <= {int}


def are_token_ids(ids, vocab_size: int) -> bool:
    """Whether every entry of the non-empty `ids` is a plain int in [0, vocab_size) (C-speed checks)."""
    return are_plain_ints(ids) and are_in_vocabulary(ids, vocab_size)


def are_in_vocabulary(ids, vocab_size: int) -> bool:
    """Whether every entry of the non-empty `ids` (ints) is in [0, vocab_size) (two C-speed passes)."""
    return min(ids) >= 0 and max(ids) < vocab_size


def check_capacity(num_pending: int, config: EngineConfig, is_waiting_for_kv: bool = False) -> None:
    """OverloadedError (429) when `num_pending` requests already fill the running slots and the queue;
    KVCacheFullError (503) when, besides, the queue waits for KV memory (`is_waiting_for_kv`)."""
    if num_pending < config.max_queue + config.max_num_seqs:
        return
    if is_waiting_for_kv:
        raise KVCacheFullError(
            f"the engine is at capacity ({num_pending} requests) and the waiting ones wait for KV memory "
            f"(--kv-cache-bytes {config.kv_cache_bytes}); retry later"
        )
    raise OverloadedError(f"the engine is at capacity ({num_pending} requests); retry later")


def check_request(request: Request, vocab_size: int, context_length: int) -> None:
    """InvalidRequestError naming the field unless `request` fits a model of this vocabulary and context."""
    ids, limit = request.prompt_ids, context_length
    if not ids:
        raise InvalidRequestError("the prompt is empty; send at least one token", "prompt")
    bad = [] if are_token_ids(ids, vocab_size) else [
        t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size
    ]
    if bad:
        raise InvalidRequestError(
            f"token id {bad[0]!r} is outside the vocabulary [0, {vocab_size})", "prompt"
        )
    if not isinstance(request.max_tokens, int) or request.max_tokens < 0:
        raise InvalidRequestError(f"max_tokens must be an integer >= 0, got {request.max_tokens!r}", "max_tokens")
    if len(ids) + request.max_tokens > limit:
        raise ContextLengthError(
            f"the prompt has {len(ids)} tokens and max_tokens is {request.max_tokens}, "
            f"which exceeds the model's context length of {limit} tokens", "max_tokens"
        )
    if request.score_from is not None and not 1 <= request.score_from <= len(ids):
        raise InvalidRequestError(
            f"score_from must be in [1, {len(ids)}] (the prompt length), got {request.score_from!r}", "score_from"
        )


def is_user_error(exc: Exception) -> bool:
    return isinstance(exc, ConstraintError)


#: a prompt whose cached prefix is shorter than this (e.g. its BOS only) may join a batched prefill,
#: computing that prefix again (the prefix cache's block size: a longer hit is worth its copy)
RECOMPUTE_BELOW_TOKENS = 16


def is_batchable_prefill(seq: Sequence) -> bool:
    """Whether the sequence may prefill in a batch (see Engine._run_prefills)."""
    return seq.num_computed < RECOMPUTE_BELOW_TOKENS and not wants_all_logits(seq)


def wants_all_logits(seq: Sequence) -> bool:
    """Whether the sequence's first forward scores its prompt (logits at every position)."""
    return seq.num_generated == 0 and seq.request.score_from is not None


def finish_reason(seq: Sequence, token: int, context_length: int) -> str | None:
    if token in seq.request.stop_token_ids:
        return "stop"
    if seq.num_generated >= seq.request.max_tokens or len(seq.ids) >= context_length:
        return "length"
    return None


def score_prompt(seq: Sequence, logits: torch.Tensor):
    """Raw log-probabilities of the prompt tokens from score_from on (logits cover new ids)."""
    request, start = seq.request, seq.num_cached
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = request.prompt_ids
    scores, tops = [], []
    for i in range(request.score_from, len(ids)):
        row = logprobs[i - 1 - start]
        scores.append(float(row[ids[i]]))
        tops.append(top_logprobs(row, request.sampling.num_top_logprobs))
    return scores, tops
