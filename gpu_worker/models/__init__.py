from gpu_worker.models.llama import LlamaArgs, LlamaForCausalLM

__all__ = ["LlamaArgs", "LlamaForCausalLM"]
