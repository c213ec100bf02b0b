"""Continuous batching over the mixture runtime: every request in flight is one row of one batch.

One worker thread owns the model. Each step decodes one token for every running request in one
forward pass, then prefills the requests that arrived since the last step (their own left-padded
forward pass, whose KV cache then joins the running batch's). Requests join between steps and
leave as they finish; no request waits for another to end. Each row carries its own routing: a
fixed weight vector over the experts (the base is all zeros, an expert one-hot, a mixture given in
the request, an example-level router's output computed once at admission), or a token-level router
that weighs the experts per token inside each layer. A batch with only fixed rows runs the mixture's
example-weights path (only the experts some row uses are gathered); one with token-routed rows runs
a per-layer routing function that fills those rows from their router.

The HTTP layer never touches torch: it submits ``Sequence``s and reads their events from a callback
(it hands them to its event loop); load, unload and refresh run on the worker between steps.

Every admitted request ends exactly once (``_end``): with its tokens, or with an error. A step that
raises costs an error for each request it touched and nothing more: a prefill that fails is retried
row by row so that one bad request fails alone; a decode that fails ends the running rows (their KV
cache may be half-written); whatever else slips through ends every request in the batch and in the
admission. The HTTP layer may end a request itself (its deadline): the worker then drops the row.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from moerge.errors import MoergeError
from moerge.lm.device import model_device
from moerge.routing import prefix
from moerge.routing.prefix import PrefixCache, pad_left
from moerge.serve.bank import ExpertBank, NotFound, Route

log = logging.getLogger("moerge.serve")

FAULT_WINDOW = 300.0  # seconds: faults within it count towards ``degraded``
DEGRADED_AFTER = 3  # faults within the window


class Busy(Exception):
    """More requests than the server admits at once (``max_concurrent``)."""


class Unavailable(Exception):
    """The server admits nothing now: it is shutting down, or its worker has stopped (HTTP 503)."""


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass(eq=False)  # rows are compared by identity
class Sequence:
    """One completion in flight; ``emit`` receives ("delta", text), then ("done", info) or ("error", message, status)."""

    prompt_ids: list[int]
    prompt_text: str  # what routers that read words see (the user message)
    route: Route
    sampling: Sampling
    emit: Callable[[tuple], None]
    out_ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the completion already emitted
    cancelled: bool = False
    weights: dict[str, float] = field(default_factory=dict)  # expert -> weight that served it
    token_usage: torch.Tensor | None = None  # a token router's summed weights per expert (over layers and tokens)
    generator: torch.Generator | None = None
    finish: str | None = None
    text: str = ""
    ended: bool = False  # answered (tokens or error) and no longer counted in flight; set once, under the engine's lock

    def cancel(self) -> None:
        """The client went away: the worker drops the row at its next step."""
        self.cancelled = True


class Engine:
    def __init__(self, bank: ExpertBank, *, max_batch: int = 32, max_concurrent: int = 64, draft=None,
                 draft_tokens: int = 4, prefix_cache: int = 4096):
        self.bank, self.model, self.tok = bank, bank.model, bank.tokenizer
        # every tensor a step makes goes where the model is (a draft model must be there too)
        self.device = model_device(self.model)
        # speculative decoding: a small model (or, with draft="ngram", prompt lookup) proposes k tokens per step
        self.ngram = draft == "ngram"
        self.draft, self.k = (None if self.ngram else draft), draft_tokens
        self.max_batch, self.max_concurrent = max_batch, max_concurrent
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        self.eos = {self.tok.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos.discard(None)
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else next(iter(self.eos), 0)
        self._cache_kw, self._last_only = prefix.cache_argument(self.model), prefix.last_logits_only(self.model)
        self._waiting: queue.Queue[Sequence] = queue.Queue()
        self._controls: queue.Queue[tuple[Callable, concurrent.futures.Future]] = queue.Queue()
        self._wake = threading.Event()
        self._stop = False
        self.draining = False  # set on shutdown: nothing new is admitted, what is in flight finishes
        self._lock = threading.Lock()
        self.in_flight = 0  # admitted and not ended (waiting + admitting + running)
        self.running: list[Sequence] = []
        self._admitting: list[Sequence] = []  # taken off the queue this step, not yet running
        self._faults: collections.deque[tuple[float, str]] = collections.deque(maxlen=100)
        self.stats = {"steps": 0, "max_batch_seen": 0, "completed": 0, "cancelled": 0, "tokens": 0, "errors": 0,
                      "timeouts": 0, "faults": 0}
        if draft is not None:
            self.stats |= {"proposed": 0, "accepted": 0, "speculative_steps": 0}
        self._cache = self._dcache = None
        # prompt tokens whose keys and values are kept for reuse (0: off; off with a draft, whose cache must match)
        self.prefixes = PrefixCache(prefix_cache if self.draft is None else 0)
        bank.use_prefixes(self.prefixes)  # task routers' base embeddings reuse it too
        self._mask: torch.Tensor | None = None
        self._batch_route = None  # what the routing state was set for: the running rows' routes
        self._thread = threading.Thread(target=self._loop, name="moerge-engine", daemon=True)
        self._thread.start()

    # ----- called from other threads -----

    def submit(self, seq: Sequence) -> None:
        if self.draining or self._stop:
            raise Unavailable("the server is shutting down; retry on another replica or after it restarts")
        if not self._thread.is_alive():
            raise Unavailable("the server's worker has stopped; restart the server")
        with self._lock:
            if self.in_flight >= self.max_concurrent:
                raise Busy(f"{self.in_flight} requests in flight, the server's limit (--max-concurrent {self.max_concurrent})")
            self.in_flight += 1
        self._waiting.put(seq)
        self._wake.set()

    def control(self, fn: Callable) -> concurrent.futures.Future:
        """Run ``fn()`` on the worker between two steps (load, unload, refresh); its result as a future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._controls.put((fn, fut))
        self._wake.set()
        return fut

    def expire(self, seq: Sequence, *, timeout: bool = False) -> bool:
        """End ``seq`` from another thread (the client went away, or its deadline passed: the caller
        answers it): it stops counting in flight now, and the worker drops its row at the next step.
        False if it had already ended."""
        seq.cancel()
        ended = self._end(seq, error="deadline" if timeout else None, cancelled=not timeout, quiet=True)
        if ended and timeout:
            self.stats["timeouts"] += 1
        return ended

    def drain(self) -> None:
        """Admit nothing more (503); what is in flight goes on to its end."""
        self.draining = True

    def close(self, timeout: float = 10) -> None:
        """Stop the worker; requests still in flight are answered 503."""
        self.draining = self._stop = True
        self._wake.set()
        self._thread.join(timeout=timeout)

    def health(self) -> dict:
        """``status``: ok; degraded (at least DEGRADED_AFTER faults within FAULT_WINDOW seconds; the
        server still serves); draining (shutting down); down (the worker has stopped)."""
        now = time.time()
        recent = [f for f in self._faults if now - f[0] <= FAULT_WINDOW]
        status = ("down" if not self._thread.is_alive() else "draining" if self.draining
                  else "degraded" if len(recent) >= DEGRADED_AFTER else "ok")
        out = {"status": status, "running": len(self.running), "waiting": self._waiting.qsize(), "in_flight": self.in_flight,
               **self.stats, "recent_faults": len(recent), "prefix_cache": {"entries": len(self.prefixes),
                                                                           "tokens": self.prefixes.tokens,
                                                                           **self.prefixes.stats}}
        if self._faults:
            out["last_fault"] = self._faults[-1][1]
        return out

    # ----- the worker -----

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            try:
                self._step()
            except Exception as exc:  # whatever slipped through: the batch's state is suspect, end every row it held
                try:
                    self._fault(exc, "step")
                    self._fail(self.running + self._admitting, exc)
                    self._admitting = []
                    self._reset_batch()
                    self.prefixes.clear()
                except Exception:  # the handler must not kill the worker
                    log.exception("moerge serve: recovering from a fault failed")
        self._shutdown()

    def _shutdown(self) -> None:
        """The worker stops: every request still admitted is answered (503), pending controls too."""
        left = self.running + self._admitting
        while not self._waiting.empty():
            left.append(self._waiting.get())
        for s in left:
            self._end(s, error="the server shut down before this request finished; retry", status=503)
        self.running, self._admitting = [], []
        while not self._controls.empty():
            _, fut = self._controls.get()
            fut.set_exception(Unavailable("the server shut down"))

    def _fault(self, exc: BaseException, where: str) -> None:
        """Log a fault (with its traceback, on the server's side only) and count it for ``health``."""
        message = f"internal error in {where}: {type(exc).__name__}: {str(exc)[:300]}"
        log.error("moerge serve: %s", message, exc_info=exc)
        self._faults.append((time.time(), message))
        self.stats["faults"] += 1

    def _reset_batch(self) -> None:
        """After a failed step: no running rows, no batch caches, no routing state."""
        self.running, self._cache, self._dcache, self._mask, self._batch_route = [], None, None, None, None
        self.bank.unroute()

    def _fail(self, rows: list[Sequence], exc: BaseException) -> None:
        for s in rows:
            self._end(s, error=f"internal error: {type(exc).__name__} while generating; the request was not completed "
                               "(see the server's log)", status=500)

    def _step(self) -> None:
        while not self._controls.empty():
            fn, fut = self._controls.get()
            try:
                fut.set_result(fn())
            except Exception as exc:
                fut.set_exception(exc)
            self._batch_route = None  # the bank may have changed: routing is set again (a rebuild drops cached prefixes)
        self._drop([s for s in self.running if s.cancelled])
        new = self._admitting = []
        while len(self.running) + len(new) < self.max_batch and not self._waiting.empty():
            s = self._waiting.get()
            if s.cancelled:
                self._end(s, cancelled=True)
            else:
                new.append(s)
        if not new and not self.running:
            self._wake.wait(0.05)
            self._wake.clear()
            return
        ok = []
        for s in new:  # a request whose expert was unloaded after it was accepted fails alone
            try:
                self.bank.check(s.route)
                ok.append(s)
            except MoergeError as exc:
                self._end(s, error=str(exc), status=404 if isinstance(exc, NotFound) else 400)
        if self.running:  # the running rows advance every step, however often new requests arrive
            try:
                self._decode()
            except Exception as exc:  # the caches may hold half a step: the running rows end, the new ones go on
                self._fault(exc, "decode")
                self._fail(self.running, exc)
                self._reset_batch()
        if ok:
            self._admit(ok)
        self._admitting = []
        self.stats["steps"] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(self.running))

    def _admit(self, new: list[Sequence]) -> None:
        """Prefill the new rows and join them to the batch. A prefill that fails touches nothing of the
        running batch: it is retried one row at a time, so that a request that cannot be served fails
        alone."""
        try:
            prefilled = self._prefill(new)
        except Exception as exc:
            if len(new) == 1:
                self._fault(exc, "prefill")
                self._fail(new, exc)
                return
            for s in new:
                self._admit([s])
            return
        cache, dcache, mask, rows, logits = prefilled
        self._join(cache, dcache, mask, rows)
        self._accept(rows, [[t] for t in self._sample(rows, logits)])

    def _prefill(self, new: list[Sequence]) -> tuple:
        """The new rows' first forward pass, in caches of their own: (cache, draft cache, mask, rows,
        last logits). The running batch is not touched. Each row's start that a cached prompt of the
        same route shares (``PrefixCache``) is taken from there; the rest is computed."""
        self.bank.assign_example_routes(new)
        for s in new:
            seed = s.sampling.seed if s.sampling.seed is not None else int.from_bytes(os.urandom(6), "little")
            s.generator = torch.Generator(device=self.device).manual_seed(seed % 2**64)  # torch takes any 64-bit pattern
        routes = [self._route_key(s) for s in new]
        rows = [s.prompt_ids for s in new]
        reuse = [self.prefixes.lookup(r, ids) for r, ids in zip(routes, rows)] if self.prefixes else []
        self._set_routing(new)
        try:
            out, cache, mask, _ = prefix.forward(self.model, rows, reuse, self.pad, self._cache_kw, **self._last_only)
            logits = out.logits[:, -1]
        finally:
            self._batch_route = None
            self.bank.unroute()
        if self.prefixes:
            prefix.keep(self.prefixes, cache, mask, rows, routes, reuse)
        dcache = None
        if self.draft is not None:  # the draft's cache holds the same columns as the model's (no prefix reuse then)
            _, dcache, _, _ = prefix.forward(self.draft, rows, [], self.pad, self._cache_kw, **self._last_only)
        return cache, dcache, mask, new, logits.float()

    def _route_key(self, s: Sequence) -> tuple:
        """What the keys and values of a row's prompt depend on besides its tokens: its expert weights,
        or its token router (call after ``assign_example_routes``)."""
        r = s.route.router
        if r is not None and self.bank.routers[r].level == "token":
            return ("token", r)
        return tuple(sorted(s.weights.items()))

    def _decode(self) -> None:
        rows = self.running
        if (self.draft is not None or self.ngram) and all(len(s.prompt_ids) + len(s.out_ids) + self.k < self.context
                                                         for s in rows):
            drafted = self._draft_proposals(rows) if self.draft is not None else self._ngram_proposals(rows)
            if drafted is not None:
                return self._speculate(rows, drafted)
        ids = torch.tensor([[s.out_ids[-1]] for s in rows], device=self.device)
        mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=torch.long, device=self.device)], 1)
        pos = self._mask.sum(1, keepdim=True)
        if self._batch_route is not rows:
            self._set_routing(rows)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                            **{self._cache_kw: self._cache}).logits[:, -1]
        self._mask = mask
        self._accept(rows, [[t] for t in self._sample(rows, logits.float())])

    def _draft_proposals(self, rows: list[Sequence]) -> torch.Tensor:
        """k greedy proposals per row from the draft model: k + 1 one-token forwards, so that its cache
        gets the same k + 1 columns as the model's. (b, k)"""
        k, b, width = self.k, len(rows), self._mask.shape[1]
        tok = torch.tensor([[s.out_ids[-1]] for s in rows], device=self.device)
        count = self._mask.sum(1, keepdim=True)
        mask = torch.cat([self._mask, torch.ones(b, k + 1, dtype=torch.long, device=self.device)], 1)
        proposals = []
        for j in range(k + 1):
            logits = self.draft(input_ids=tok, attention_mask=mask[:, : width + j + 1], position_ids=count + j,
                                use_cache=True, **{self._cache_kw: self._dcache}).logits[:, -1]
            if j < k:
                tok = logits.argmax(-1, keepdim=True)
                proposals.append(tok)
        return torch.cat(proposals, 1)

    def _ngram_proposals(self, rows: list[Sequence]) -> torch.Tensor | None:
        """Prompt lookup (``--draft ngram``): for each greedy row, the k tokens that followed the latest
        earlier occurrence of its last 3 (else 2, else 1) tokens in its prompt and output, padded with
        its last token. None when no row has such an occurrence: a plain step is cheaper then. (b, k)"""
        k, out, hit = self.k, [], False
        for s in rows:
            found = ngram_lookup(s.prompt_ids + s.out_ids, k) if s.sampling.temperature == 0 else []
            hit = hit or bool(found)
            out.append(found + [s.out_ids[-1]] * (k - len(found)))
        return torch.tensor(out, device=self.device) if hit else None

    def _speculate(self, rows: list[Sequence], drafted: torch.Tensor) -> None:
        """One step of speculative decoding for the whole batch, over k proposals per row (from the
        draft model, or from prompt lookup). The model scores the last token and the k proposals in one
        forward; a greedy row keeps the longest run of proposals the model agrees with plus the model's
        own next token, so its text is what plain greedy decoding gives (to the last bit in float32; in
        bf16 the k + 1 positions checked at once round differently, so a near-tie can flip); a sampled row keeps
        only the model's first token, sampled as usual. Columns of rejected proposals stay in the
        caches, masked out (positions come from the mask, so they count for nothing), until
        ``_compact`` squeezes them out."""
        k = self.k
        b, width = len(rows), self._mask.shape[1]
        last = torch.tensor([[s.out_ids[-1]] for s in rows], device=self.device)
        count = self._mask.sum(1, keepdim=True)
        mask = torch.cat([self._mask, torch.ones(b, k + 1, dtype=torch.long, device=self.device)], 1)
        if self._batch_route is not rows:
            self._set_routing(rows)
        logits = self.model(input_ids=torch.cat([last, drafted], 1), attention_mask=mask,
                            position_ids=count + torch.arange(k + 1, device=self.device), use_cache=True,
                            **{self._cache_kw: self._cache}).logits.float()  # (b, k + 1, vocab)
        best = logits.argmax(-1)
        sampled = self._sample(rows, logits[:, 0])
        tokens = []
        for i, s in enumerate(rows):
            n = 0
            if s.sampling.temperature == 0:
                while n < k and drafted[i, n] == best[i, n]:
                    n += 1
                tokens.append(drafted[i, :n].tolist() + [int(best[i, n])])
            else:
                tokens.append([sampled[i]])
            mask[i, width + n + 1:] = 0  # the proposals after the first rejected one
            self.stats["proposed"] += k
            self.stats["accepted"] += n
        self.stats["speculative_steps"] += 1
        self._mask = mask
        self._accept(rows, tokens)
        self._compact()

    def _compact(self) -> None:
        """When masked-out columns take over half the caches, move each row's live columns to the right
        end (a gather per row) and cut the columns no row uses any more."""
        if self._mask is None:
            return
        live = self._mask.sum(1)
        width, need = self._mask.shape[1], int(live.max())
        if width <= 2 * need + 8:
            return
        order = torch.sort(self._mask, dim=1, stable=True).indices[:, width - need:]  # live columns last, in order
        self._mask = self._mask.gather(1, order)
        for cache in self._caches():
            for layer in cache.layers:
                idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)

    def _caches(self) -> list:
        return [c for c in (self._cache, self._dcache) if c is not None]

    def _set_routing(self, rows: list[Sequence]) -> None:
        self.bank.route_rows(rows)
        self._batch_route = rows

    def _join(self, cache, dcache, mask: torch.Tensor, new: list[Sequence]) -> None:
        """Append the new rows' caches to the running batch's, left-padding the shorter to one length."""
        if not self.running:
            self._cache, self._dcache, self._mask = cache, dcache, mask
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            for ours, theirs in zip(self._caches(), [c for c in (cache, dcache) if c is not None]):
                for mine, other in zip(ours.layers, theirs.layers):
                    mine.keys = torch.cat([pad_left(mine.keys, width), pad_left(other.keys, width)], 0)
                    mine.values = torch.cat([pad_left(mine.values, width), pad_left(other.values, width)], 0)
            self._mask = torch.cat([pad_left(self._mask, width, dim=1), pad_left(mask, width, dim=1)], 0)
        self.running = self.running + new
        self._batch_route = None

    def _drop(self, gone: list[Sequence]) -> None:
        """Remove finished or cancelled rows from the batch and its cache, and the columns no row needs."""
        if not gone:
            return
        for s in gone:
            if s.finish is None:
                self._end(s, cancelled=True)
        keep = [i for i, s in enumerate(self.running) if s not in gone]
        self.running = [self.running[i] for i in keep]
        self._batch_route = None
        if not self.running:
            self._cache = self._dcache = self._mask = None
            self.bank.unroute()
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0])  # leading columns that are padding in every row left
        self._mask = mask[:, start:]
        for cache in self._caches():
            for layer in cache.layers:
                layer.keys = layer.keys.index_select(0, index)[:, :, start:]
                layer.values = layer.values.index_select(0, index)[:, :, start:]

    def _accept(self, rows: list[Sequence], tokens: list[list[int]]) -> None:
        """Append each row's new tokens (one, or several from speculation), emit the text they add, and
        end the rows that are done (end of sequence, max_tokens, the context, a stop string)."""
        done = []
        for s, new in zip(rows, tokens):
            for t in new:
                if t in self.eos and not s.sampling.ignore_eos:
                    s.finish = "stop"
                    break
                s.out_ids.append(t)
                self.stats["tokens"] += 1
                if len(s.out_ids) >= s.sampling.max_tokens or len(s.prompt_ids) + len(s.out_ids) >= self.context:
                    s.finish = "length"
                    break
            self._emit_text(s, final=s.finish is not None)  # a stop string in the text ends the row here too
            if s.finish:
                done.append(s)
        for s in done:
            self._end(s)
        self._drop(done)

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> list[int]:
        greedy = logits.argmax(-1).tolist()
        out = []
        for i, s in enumerate(rows):
            sp = s.sampling
            if sp.temperature == 0:
                out.append(greedy[i])
                continue
            probs = torch.softmax(logits[i] / sp.temperature, -1)
            if sp.top_p < 1.0:
                p, idx = probs.sort(descending=True)
                keep = (p.cumsum(0) - p) < sp.top_p  # the smallest set whose mass reaches top_p
                probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
            out.append(int(torch.multinomial(probs, 1, generator=s.generator)))
        return out

    def _emit_text(self, s: Sequence, final: bool = False) -> None:
        """Emit what is certain of the text so far: hold back a stop string's possible start and a
        character cut in half by the tokenizer until the next token settles them."""
        text = self.tok.decode(s.out_ids, skip_special_tokens=True)
        stops = s.sampling.stop
        for st in stops:
            i = text.find(st, max(0, s.sent - len(st)))
            if i >= 0:
                text, s.finish, final = text[:i], "stop", True
        s.text = text
        safe = len(text)
        if not final:
            hold = max((len(st) - 1 for st in stops), default=0)
            safe = max(s.sent, len(text) - hold)
            while safe > s.sent and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe > s.sent:
            s.emit(("delta", text[s.sent:safe]))
            s.sent = safe

    def _end(self, s: Sequence, *, error: str | None = None, status: int = 500, cancelled: bool = False,
             quiet: bool = False) -> bool:
        """Answer ``s`` and stop counting it in flight, once: a second call (the worker finishing a row the
        HTTP layer already gave up on) does nothing and returns False."""
        with self._lock:
            if s.ended:
                return False
            s.ended = True
            self.in_flight -= 1
        if cancelled:
            self.stats["cancelled"] += 1
            s.finish = s.finish or "cancelled"
            return True
        if error:
            s.finish = "error"
            self.stats["errors"] += 1
            if not quiet:
                s.emit(("error", error, status))
            return True
        self.stats["completed"] += 1
        s.emit(("done", {"finish_reason": s.finish, "prompt_tokens": len(s.prompt_ids),
                         "completion_tokens": len(s.out_ids), "experts": self.bank.served_by(s)}))
        return True


def ngram_lookup(seq: list[int], k: int, longest: int = 3, window: int = 2048) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of ``seq``'s last n tokens (n from
    ``longest`` down to 1) within its last ``window`` tokens; [] if none. Prompt lookup decoding
    (Saxena 2023; vLLM's ``ngram`` speculation): answers that copy from their prompt get long runs."""
    seq = seq[-window:]
    end = len(seq)
    if end < 2:
        return []
    last = seq[-1]
    spots = [i for i in range(end - 2, -1, -1) if seq[i] == last]  # latest first, each leaving a token after it
    for n in range(min(longest, end - 1), 0, -1):
        tail = seq[end - n:]
        for i in spots:
            if i - n + 1 >= 0 and seq[i - n + 1:i + 1] == tail:
                return seq[i + 1:i + 1 + k]
    return []
