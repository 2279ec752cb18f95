"""Sampling parameters of one request, validated once at the edge (gateway, LLM API, CLI).

Field names follow vLLM's SamplingParams and the OpenAI API, so users find what they expect. Unknown
fields are rejected (extra="forbid") so a typo is an error that names the field, not a silent default.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    def use_beam_search(self) -> bool:
        return self.beam_width > 0

    @property
    def num_logprobs_needed(self) -> int:
        """Top-k logprobs the worker must return per sampled token (beam search needs 2 * width)."""
        if self.use_beam_search:
            return 2 * self.beam_width
        return self.logprobs or 0
