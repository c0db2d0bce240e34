"""Tokenizer: byte-level BPE or SentencePiece-style BPE built with `tokenizers` from a GGUF vocab,
or a tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
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
NORMAL_TOKEN, USER_DEFINED_TOKEN, BYTE_TOKEN = 1, 4, 6
SPM_SPACE = "\u2581"  # SentencePiece's visible space


def _spm_merges(tokens: list[str], scores: list[float], token_types: list[int] | None) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece/llama.cpp's score-driven merging.

    llama.cpp's SPM tokenizer repeatedly joins the adjacent pair whose concatenation is the vocabulary
    piece with the highest score. A BPE model does the same if every split (a, b) of every normal piece
    is a merge, ranked by the piece's score: the best-scoring available pair always merges first.
    """
    vocab = set(tokens)
    ranked: list[tuple[float, int, str, str]] = []
    for i, piece in enumerate(tokens):
        if len(piece) < 2 or (token_types and token_types[i] != NORMAL_TOKEN):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


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
        scores: list[float] | None = None,
        add_space_prefix: bool = True,
        default_chat_template: str | None = None,
    ) -> Tokenizer:
        if model == "llama":
            backend = _spm_backend(tokens, scores, token_types, add_space_prefix, source)
            return cls(backend, bos_id, eos_id, add_bos, chat_template or default_chat_template)
        if model != "gpt2":
            raise ForethoughtError(f"{source}: tokenizer type {model!r} is not supported (supported: 'gpt2', 'llama')")
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
        if self.add_bos and bos and text.startswith(bos):
            text = text[len(bos) :]  # encode() adds it; a template's own copy would make it twice
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


def _spm_backend(
    tokens: list[str] | None,
    scores: list[float] | None,
    token_types: list[int] | None,
    add_space_prefix: bool,
    source: str,
) -> HFTokenizer:
    """A SentencePiece-style ("llama" in GGUF) tokenizer as llama.cpp runs it: control and user-defined
    pieces are cut out of the raw text first (longest first), spaces become U+2581, pieces are merged by
    score, and characters outside the vocabulary fall back to <0xXX> byte pieces."""
    for key, value in (("tokens", tokens), ("scores", scores), ("token_type", token_types)):
        if not value:
            raise ForethoughtError(f"{source}: metadata key tokenizer.ggml.{key} is missing")
    if not len(tokens) == len(scores) == len(token_types):
        raise ForethoughtError(
            f"{source}: tokenizer.ggml.tokens, .scores and .token_type differ in length "
            f"({len(tokens)}, {len(scores)}, {len(token_types)})"
        )
    vocab = {piece: i for i, piece in enumerate(tokens)}
    unk = next((p for p, kind in zip(tokens, token_types) if kind == 2), None)
    bpe = models.BPE(
        vocab=vocab, merges=_spm_merges(tokens, scores, token_types), unk_token=unk, byte_fallback=True, fuse_unk=True
    )
    backend = HFTokenizer(bpe)
    steps = [normalizers.Replace(" ", SPM_SPACE)]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend(SPM_SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode)
    backend.add_tokens(
        [
            AddedToken(piece, special=kind == CONTROL_TOKEN, normalized=False)
            for piece, kind in zip(tokens, token_types)
            if kind in (CONTROL_TOKEN, USER_DEFINED_TOKEN)
        ]
    )
    return backend


class StreamDecoder:
    """Turns ids into text one at a time, holding back bytes of a character not yet complete.

    `context` (the prompt's ids) is decoded in front of the new ids and cut off again, so the first new token
    gets the separator that only its left neighbour decides: a word-level tokenizer's space, SentencePiece's
    leading "▁" that decoding drops at the start of a text.
    """

    CONTEXT_TOKENS = 8  # the last few prompt tokens decide the joint; decoding the whole prompt each step would not

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False, context: list[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special  # e.g. a chat answer's closing <|im_end|>
        self.context = list(context)[-self.CONTEXT_TOKENS :]
        self.prefix = tokenizer.decode(self.context, skip_special=skip_special) if self.context else ""
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.context + self.ids, skip_special=self.skip_special)
        if text.startswith(self.prefix):
            text = text[len(self.prefix) :]
        else:  # a decoder that rewrites across the joint: fall back to the new ids alone
            text = self.tokenizer.decode(self.ids, skip_special=self.skip_special)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its next byte
            return ""
        new = text[self.emitted :]
        self.emitted = len(text)
        return new
