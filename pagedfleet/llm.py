"""LLM: the offline Python API, shaped like vLLM's (`generate`, `chat`)."""

from __future__ import annotations

from typing import Any, Sequence

from protocol import SamplingParams
from pagedfleet.engine import EngineConfig, LLMEngine
from pagedfleet.outputs import RequestOutput

Prompt = str | list[int]
Messages = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str | None = None, **engine_options: Any):
        self.engine = LLMEngine(EngineConfig(model=model), **engine_options)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | dict | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt; outputs come back in the order of the prompts.

        Every request is validated before any is enqueued, so a bad one raises and none runs.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError("sampling_params: need one per prompt")
            params = [self._params(p) for p in sampling_params]
        else:
            params = [self._params(sampling_params)] * len(prompts)
        # Validate everything first (tokenise, check lengths) so a bad prompt disturbs nothing.
        for p in prompts:
            _, ids = self.engine.tokenize(p)
            if len(ids) >= self.engine.max_model_len:
                raise ValueError(
                    f"prompt: {len(ids)} tokens do not fit the model's context of {self.engine.max_model_len} tokens"
                )
        ids = [
            self.engine.add_request(p, sp, priority=(priority[i] if priority else 0))
            for i, (p, sp) in enumerate(zip(prompts, params))
        ]
        done = {o.request_id: o for o in self.engine.run_to_completion()}
        return [done[i] for i in ids]

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | dict | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        if self.tokenizer is None:
            raise ValueError("chat: this model has no tokenizer or chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.encode_chat(list(c), add_generation_prompt) for c in conversations]
        outs = self.generate(prompts, sampling_params)
        for o, c in zip(outs, conversations):
            o.prompt = self.tokenizer.apply_chat_template(list(c), add_generation_prompt)
        return outs

    @staticmethod
    def _params(p: SamplingParams | dict | None) -> SamplingParams:
        if p is None:
            return SamplingParams()
        if isinstance(p, dict):
            return SamplingParams(**p)
        return p
