"""Grammars of structured outputs, compiled off the step loop and cached by spec (torch-free: the worker
masks with them, gpu_worker/structured_output.py; the gateway compiles a spec once to refuse a bad one
with a 400).

The engine is llguidance (docs/structured_outputs.md says why: fastest compile and mask fill of the three
maintained engines measured, and no dependency). A spec is compiled once, in a thread pool; the compiled
matcher is cached (LRU) and every sequence gets its own copy of it (``deep_copy``: no recompile).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from protocol.sampling import StructuredOutput

log = logging.getLogger(__name__)


def grammar_text(so: StructuredOutput) -> str:
    """llguidance's grammar definition of a spec (raises ValueError on a malformed spec)."""
    import llguidance

    if so.kind == "json":
        # compact JSON as OpenAI writes it (", " and ": "), not any whitespace: fewer tokens, no runaway
        # newlines from a small model; a schema's own x-guidance options win
        return llguidance.LLMatcher.grammar_from_json_schema(so.spec, defaults={"whitespace_flexible": False})
    if so.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(so.spec)
    return llguidance.grammar_from("choice" if so.kind == "choice" else "grammar", so.spec)


class GrammarCompiler:
    """Compiled matchers by spec (LRU), compiled in background threads; one per worker (or gateway)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int], max_cached: int = 512,
                 threads: int = 2):
        import llguidance

        self.vocab_size = vocab_size
        self.eos = list(eos_token_ids)
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=self.eos or None)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grammar")
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_cached

    @classmethod
    def for_model(cls, model_dir: str | Path, vocab_size: int, eos_token_ids: Sequence[int]) -> "GrammarCompiler":
        return cls((Path(model_dir) / "tokenizer.json").read_text(), vocab_size, eos_token_ids)

    def _compile(self, so: StructuredOutput):
        import llguidance

        m = llguidance.LLMatcher(self.tokenizer, grammar_text(so))
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def compiled(self, so: StructuredOutput) -> Future:
        """A future of the spec's compiled matcher (a template: copy it, never advance it)."""
        with self._lock:
            f = self._cache.get(so.key)
            if f is not None:
                self._cache.move_to_end(so.key)
                return f
            f = self._pool.submit(self._compile, so)
            self._cache[so.key] = f
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
            return f

    def check(self, so: StructuredOutput) -> str | None:
        """The compile error of a spec, or None (blocks: call it from a thread)."""
        try:
            self.compiled(so).result()
        except Exception as e:
            return str(e) or type(e).__name__
        return None

    def new_sequence(self, so: StructuredOutput, generated: Sequence[int] = ()) -> "SeqGrammar":
        return SeqGrammar(self.compiled(so), list(generated))


class SeqGrammar:
    """One sequence's matcher: a pending compile until first needed, then its own copy. Tokens it has not
    consumed yet wait in ``_pending`` (a recomputed sequence's earlier tokens) or ``_later`` (tokens still
    on the device: ``source.host_tokens()[index]``, fetched when the matcher is next needed, typically
    by the thread that fills the next step's bitmasks)."""

    __slots__ = ("_template", "_pending", "_m", "_later")

    def __init__(self, template: Future | None, pending: list[int], matcher=None):
        self._template, self._pending, self._m = template, pending, matcher
        self._later: list = []

    def feed_later(self, source, index: int) -> None:
        """Consume ``source.host_tokens()[index]`` before the matcher is next used."""
        self._later.append((source, index))

    def matcher(self):
        m = self._own()
        if self._later:
            later, self._later = self._later, []
            for source, index in later:
                if not m.is_error():
                    m.consume_token(source.host_tokens()[index])
        return m

    def _own(self):
        """The sequence's own matcher (copied from the compiled template at first use), without the tokens
        still in ``_later``."""
        if self._m is None:
            try:
                self._m = self._template.result().deep_copy()
            except Exception as e:  # the gateway checks specs first; a failure here ends the sequence (EOS)
                log.warning("structured output: compile failed: %s", e)
                self._m = _Failed()
            if self._pending:  # a recomputed sequence: its earlier tokens
                self._m.consume_tokens(self._pending)
                self._pending = []
        return self._m

    def copy(self) -> "SeqGrammar":
        return SeqGrammar(None, [], self.matcher().deep_copy())


def matchers_of(grammars: Sequence[SeqGrammar], executor) -> list:
    """Every grammar's matcher, each with the tokens it has not consumed yet: a step's one token per sequence
    in one parallel call (``LLExecutor.consume_token_par``, outside the GIL) instead of a call per sequence."""
    matchers, pairs = [], []
    for g in grammars:
        later = g._later
        if len(later) > 1:  # more than one step behind (rare): in order, one by one
            matchers.append(g.matcher())
            continue
        m = g._own()
        matchers.append(m)
        if later:
            g._later = []
            source, index = later[0]
            if not m.is_error():
                pairs.append((m, source.host_tokens()[index]))
    if pairs:
        executor.consume_token_par(pairs)
    return matchers


class _Failed:
    """A matcher that is always in error (so its sequence can only end)."""

    def is_error(self) -> bool:
        return True

    def consume_token(self, _t: int) -> bool:
        return False

    def consume_tokens(self, _ts) -> bool:
        return False

    def deep_copy(self) -> "_Failed":
        return self
