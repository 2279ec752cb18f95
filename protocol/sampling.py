"""Sampling parameters of one request, validated once at the edge (gateway, LLM API, CLI).

Field names follow vLLM's SamplingParams and the OpenAI API, so users find what they expect. Unknown
fields are rejected (extra="forbid") so a typo is an error that names the field, not a silent default.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

StructuredKind = Literal["json", "regex", "choice", "grammar"]


class StructuredOutput(BaseModel):
    """A constraint on the generated text, enforced token by token (gpu_worker/structured_output.py).
    ``json``: a JSON schema (``{"type": "object"}`` for OpenAI's json_object); ``regex``; ``choice``: one of
    the strings; ``grammar``: a Lark or GBNF grammar (vLLM's guided_grammar)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: StructuredKind
    spec: str = Field(description="the JSON schema as JSON text, the regex, the choices as a JSON list, the grammar")

    @classmethod
    def of_json_schema(cls, schema: dict | str) -> "StructuredOutput":
        return cls(kind="json", spec=schema if isinstance(schema, str) else json.dumps(schema))

    @property
    def key(self) -> str:
        """What identifies the compiled grammar (its cache key)."""
        return f"{self.kind}:{self.spec}"


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(1, ge=1, le=128, description="completions returned for the prompt")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 or 0 disables")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same output")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    max_tokens: int = Field(16, ge=1, description="tokens to generate at most")
    min_tokens: int = Field(0, ge=0, description="EOS and stop tokens are masked until this many")
    stop: list[str] = Field(default_factory=list, description="stop strings, excluded from the output")
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="top-k logprobs per generated token")
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    beam_width: int = Field(0, ge=0, le=32, description="> 0 turns on beam search; n beams returned")
    length_penalty: float = 1.0
    skip_special_tokens: bool = True
    structured_output: StructuredOutput | None = Field(None, description="constrain the output (JSON schema, ...)")
    logit_bias: dict[int, float] = Field(default_factory=dict, description="token id -> bias added to its logit")

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float]) -> dict[int, float]:
        bad = [t for t, b in v.items() if t < 0 or not -100.0 <= b <= 100.0]
        if bad:
            raise ValueError(f"logit_bias: token ids must be >= 0 and biases in [-100, 100] (token {bad[0]})")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        return v

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "SamplingParams":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.structured_output is not None and self.beam_width:
            raise ValueError("structured outputs do not combine with beam search")
        if self.beam_width and self.n > self.beam_width:
            raise ValueError(f"n ({self.n}) must be <= beam_width ({self.beam_width}) for beam search")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 and self.beam_width == 0

    @property
    def has_penalties(self) -> bool:
        """A repetition, frequency or presence penalty is set (the sampler then needs the token history)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def has_logits_processors(self) -> bool:
        """A grammar or a logit bias changes the logits (the sampler's slow path)."""
        return self.structured_output is not None or bool(self.logit_bias)

    @property
    def use_beam_search(self) -> bool:
        return self.beam_width > 0

    @property
    def num_logprobs_needed(self) -> int:
        """Top-k logprobs the worker must return per sampled token (beam search needs 2 * width)."""
        if self.use_beam_search:
            return 2 * self.beam_width
        return self.logprobs or 0
