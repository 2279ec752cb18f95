"""Tokenizer and chat template of a model directory (Hugging Face layout).

Runtime needs only the `tokenizers` library and jinja2: tokenizer.json is the fast tokenizer itself,
and the chat template is rendered the way transformers renders it (sandboxed jinja2, trim_blocks,
lstrip_blocks), so our prompts are byte-identical to the oracle's.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from tokenizers import Tokenizer as _FastTokenizer


def _raise_exception(message: str):
    raise ValueError(message)


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        self.path = model_dir
        self._tok = _FastTokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg_path = model_dir / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.chat_template: str | None = self._find_chat_template(model_dir)
        self._special_ids = {
            t.id if hasattr(t, "id") else i
            for i, t in self._tok.get_added_tokens_decoder().items()
            if getattr(t, "special", False)
        }
        self.bos_token = self._token_str(self.config.get("bos_token"))
        self.eos_token = self._token_str(self.config.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None

    @staticmethod
    def _token_str(tok: Any) -> str | None:
        if isinstance(tok, dict):
            return tok.get("content")
        return tok

    @staticmethod
    def _find_chat_template(model_dir: Path) -> str | None:
        jinja = model_dir / "chat_template.jinja"
        if jinja.exists():
            return jinja.read_text()
        cfg = model_dir / "tokenizer_config.json"
        if cfg.exists():
            tpl = json.loads(cfg.read_text()).get("chat_template")
            if isinstance(tpl, list):  # named templates: take the default one
                tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
            return tpl
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode does not), so a long text tokenised in a worker thread
        # leaves the gateway's event loop free; the ids are the same
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        return [self._tok.id_to_token(i) or "" for i in token_ids]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        if not self.chat_template:
            raise ValueError(f"the model at {self.path} has no chat template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        template = env.from_string(self.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # The template already carries the special tokens, as in transformers' apply_chat_template.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)
