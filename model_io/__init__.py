"""Model I/O shared by the gateway, the GPU worker and the offline engine; torch-free.

`model_files` turns a model spec into a local Hugging Face directory, `tokenizer` is the tokenizer and
chat template of such a directory, and `output_processor` turns the scheduler's token deltas into text
(incremental detokenisation, stop strings, logprobs, finish reasons): the one copy both the offline
engine and the gateway use.
"""
