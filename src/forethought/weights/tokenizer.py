"""Tokenizer: byte-level BPE built with `tokenizers` from a GGUF vocab, or a tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from forethought.errors import ForethoughtError
from forethought.weights.files import read_json

# How text is cut into words before BPE, by llama.cpp's `tokenizer.ggml.pre` name. The merges were
# learned on words cut this way, so using another split changes the ids.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
CONTROL_TOKEN = 3  # llama.cpp token type of <|im_start|>, <|endoftext|> ...


def _pre_tokenizer(pre: str | None):
    if pre in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM splits every digit on its own before the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


class Tokenizer:
    """Text <-> token ids, plus what generation needs: EOS/BOS ids and the chat template."""

    def __init__(
        self,
        backend: HFTokenizer,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.chat_template = chat_template

    @classmethod
    def from_gguf_fields(
        cls,
        model: str | None,
        pre: str | None,
        tokens: list[str] | None,
        merges: list[str] | None,
        token_types: list[int] | None,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        chat_template: str | None,
        source: str,
    ) -> Tokenizer:
        if model != "gpt2":
            raise ForethoughtError(f"{source}: tokenizer type {model!r} is not supported (only byte-level BPE 'gpt2')")
        if not tokens or merges is None:
            raise ForethoughtError(f"{source}: the GGUF has no tokenizer vocabulary or merges")
        vocab = {token: i for i, token in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        backend.pre_tokenizer = _pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        if token_types:
            special = [
                AddedToken(t, special=True, normalized=False)
                for t, kind in zip(tokens, token_types)
                if kind == CONTROL_TOKEN
            ]
            backend.add_special_tokens(special)
        return cls(backend, bos_id, eos_id, add_bos, chat_template)

    @classmethod
    def from_hf_folder(cls, folder: Path, generation_eos: int | None) -> Tokenizer:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ForethoughtError(f"{folder}: no tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ForethoughtError(f"{path}: unreadable tokenizer ({e})") from None
        settings = {}
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            settings = read_json(config_path)

        def token_id(key: str) -> int | None:
            value = settings.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        eos = token_id("eos_token")
        return cls(
            backend,
            bos_id=token_id("bos_token"),
            eos_id=eos if eos is not None else generation_eos,
            add_bos=bool(settings.get("add_bos_token", False)),
            chat_template=settings.get("chat_template"),
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        check_text(text)
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_str(self, token_id: int) -> str:
        """One token as text, for tables and the viewer (a partial UTF-8 byte shows as U+FFFD)."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, user_message: str) -> str:
        if not self.chat_template:
            raise ForethoughtError("this model has no chat template; drop --chat")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )

        def raise_exception(message: str):
            raise ForethoughtError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        bos = self.backend.id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos = self.backend.id_to_token(self.eos_id) if self.eos_id is not None else ""
        try:  # the template is code from the model file: any failure in it is the file's, reported in one line
            template = env.from_string(chat_template_text(self.chat_template))
            text = template.render(
                messages=[{"role": "user", "content": user_message}],
                add_generation_prompt=True,
                bos_token=bos,
                eos_token=eos,
            )
        except ForethoughtError:
            raise
        except Exception as e:  # noqa: BLE001 - jinja2 syntax/undefined errors, and whatever the template divides by
            raise ForethoughtError(f"chat template: {type(e).__name__}: {str(e)[:200]}") from None
        if not isinstance(text, str):
            raise ForethoughtError("chat template: did not render to text")
        return text


def chat_template_text(template: object) -> str:
    """The template's source: a string, or from HF's list of named templates the one called "default"."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        raise ForethoughtError(f"chat template: expected text, got {type(template).__name__}")
    return template


def check_text(text: str) -> None:
    """Text that is real Unicode: command-line bytes that are not UTF-8 arrive as lone surrogates (Python's
    surrogateescape), and so can lone surrogates in JSON; the tokenizer would fail on them with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ForethoughtError(
            f"the text is not valid UTF-8 (character {e.start}: {text[e.start : e.end]!a}); pass UTF-8 text"
        ) from None


class StreamDecoder:
    """Turns ids into text one at a time, holding back bytes of a character not yet complete."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special  # e.g. a chat answer's closing <|im_end|>
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special=self.skip_special)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its next byte
            return ""
        new = text[self.emitted :]
        self.emitted = len(text)
        return new
