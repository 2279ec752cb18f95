"""PagedFleet: LLM serving on PagedAttention.

`from pagedfleet import LLM` gives the offline engine. The import is lazy so that torch-free parts
(the gateway, the scheduler service) never load torch through it (model files and the tokenizer live in `model_io`).
"""

__all__ = ["LLM", "LLMEngine", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from pagedfleet.llm import LLM

        return LLM
    if name == "LLMEngine":
        from pagedfleet.engine import LLMEngine

        return LLMEngine
    if name == "SamplingParams":
        from protocol import SamplingParams

        return SamplingParams
    raise AttributeError(name)
