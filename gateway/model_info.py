"""The served model as the gateway sees it: name and aliases, tokenizer, context length and vocabulary, read
from the model's files (the workers' WorkerInfo overrides the limits once they register)."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.fleet import ModelInfo
from gateway.settings import GatewaySettings


def load_model_info(settings: GatewaySettings) -> ModelInfo:
    """The served model's tokenizer and limits (from its files; the workers' WorkerInfo overrides)."""
    from model_io.tokenizer import Tokenizer

    model_dir: Path | None = Path(settings.model_dir) if settings.model_dir else None
    name = settings.served_model_name
    if model_dir is None:
        from model_io.model_files import resolve_model

        files = resolve_model(settings.model)
        model_dir = Path(files.path) if files.path is not None else None
        name = name or files.name
    name = name or settings.model or (model_dir.name if model_dir else "default")
    tokenizer = Tokenizer(model_dir) if model_dir is not None and (model_dir / "tokenizer.json").exists() else None
    max_len, vocab = settings.max_model_len, None
    cfg = model_dir / "config.json" if model_dir is not None else None
    if cfg is not None and cfg.exists():
        c = json.loads(cfg.read_text())
        max_len = max_len or c.get("max_position_embeddings")
        vocab = c.get("vocab_size")
    aliases = {name}
    if settings.model:
        aliases.add(settings.model)
    return ModelInfo(name=name, aliases=aliases, model_dir=model_dir, tokenizer=tokenizer,
                     default_max_model_len=int(max_len or 2048), vocab_size=vocab)
