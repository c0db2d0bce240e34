"""Validation at the edge: every value read from a model file is checked here, once, before it sizes anything.

A model file is user input. Its metadata decides how much memory is allocated and how loops run, so a single
edited field (an alignment of 0, a block count of 2^40, a context of 1e9, a string where a number belongs)
must end in one `ForethoughtError` line naming the field and the value -- not a traceback, a hang or a
multi-gigabyte allocation. The loaders call these functions; they stay free of checks of their own.

The rule that bounds memory: every size in a config must equal the shape of a tensor that is really in the
file (whose bytes were checked against the file's size), so nothing is allocated that the file does not pay
for. The declared context length sizes nothing (RoPE tables and KV caches grow with use).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from forethought.errors import ForethoughtError

# Far above any real model, far below what would overflow an int64 product or a C++ int32 index.
MAX_SIZE = 2**31 - 1
MAX_LAYERS = 10_000
MAX_DIMS = 4  # GGML tensors have at most four dimensions
MAX_ALIGNMENT = 1 << 20

# GGUF keys under `{arch}.` that are sizes (positive integers) and floats that must be finite and positive.
GGUF_SIZE_KEYS = (
    "block_count",
    "context_length",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "vocab_size",
    "rope.dimension_count",
)
GGUF_FLOAT_KEYS = ("rope.freq_base", "attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon")
HF_SIZE_KEYS = (
    "n_layer",
    "n_embd",
    "n_head",
    "n_inner",
    "n_positions",
    "vocab_size",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "max_position_embeddings",
)
HF_FLOAT_KEYS = ("layer_norm_epsilon", "rms_norm_eps", "rope_theta")
HF_BOOL_KEYS = ("tie_word_embeddings", "attention_bias")


def _show(value: object) -> str:
    """A value as it goes into a one-line message: short, and never a megabyte of digits."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**18:
        return f"an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'thousands of'} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def size(value: object, field: str, source: object, maximum: int = MAX_SIZE) -> int:
    """A positive integer no larger than `maximum` (bools, floats and strings are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ForethoughtError(f"{source}: {field} must be a positive integer, got {_show(value)}")
    if not 0 < value <= maximum:
        raise ForethoughtError(f"{source}: {field} must be in 1..{maximum}, got {_show(value)}")
    return value


def positive_float(value: object, field: str, source: object, below: float = math.inf) -> float:
    """A finite real number in (0, below)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ForethoughtError(f"{source}: {field} must be a number, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ForethoughtError(f"{source}: {field} is too large, got {_show(value)}") from None
    if not (math.isfinite(number) and 0 < number < below):
        bound = f"below {below:g}" if math.isfinite(below) else "finite"
        raise ForethoughtError(f"{source}: {field} must be positive and {bound}, got {_show(value)}")
    return number


def alignment(value: object, source: object) -> int:
    """GGUF `general.alignment`: a power of two (the data section starts at a multiple of it)."""
    value = size(value, "general.alignment", source, MAX_ALIGNMENT)
    if value & (value - 1):
        raise ForethoughtError(f"{source}: general.alignment must be a power of two, got {value}")
    return value


def tensor_dims(name: str, dims: list[int], source: object) -> int:
    """A GGUF tensor's dimensions: 1..4 of them, each positive; returns the element count (exact, no overflow)."""
    if not 1 <= len(dims) <= MAX_DIMS:
        raise ForethoughtError(f"{source}: tensor {name} has {len(dims)} dimensions (1 to {MAX_DIMS} allowed)")
    for d in dims:
        if not 0 < d <= MAX_SIZE:
            raise ForethoughtError(f"{source}: tensor {name} has a dimension of {d}")
    return math.prod(dims)  # Python ints: numpy's prod would wrap around silently


def tensor_extents(extents: Iterable[tuple[str, int, int]], file_size: int, source: object) -> None:
    """Each tensor's bytes [offset, offset + nbytes) lie inside the file and overlap no other tensor's."""
    seen: set[str] = set()
    spans = []
    for name, offset, nbytes in extents:
        if name in seen:
            raise ForethoughtError(f"{source}: tensor {name} appears twice")
        seen.add(name)
        if offset + nbytes > file_size:
            raise ForethoughtError(
                f"{source} is truncated: tensor {name} needs bytes up to {offset + nbytes}, the file has {file_size}"
            )
        spans.append((offset, nbytes, name))
    spans.sort()
    for (a_off, a_len, a_name), (b_off, _, b_name) in zip(spans, spans[1:]):
        if a_off + a_len > b_off:
            raise ForethoughtError(f"{source}: tensors {a_name} and {b_name} overlap in the file")


def gguf_fields(fields: Mapping[str, object], source: object) -> None:
    """Types and ranges of the GGUF metadata the loader reads, before any of it is used."""
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise ForethoughtError(f"{source}: general.architecture must be a string, got {_show(arch)}")
    for key in GGUF_SIZE_KEYS:
        full = f"{arch}.{key}"
        if full in fields:
            size(fields[full], full, source, MAX_LAYERS if key == "block_count" else MAX_SIZE)
    heads, width = fields.get(f"{arch}.attention.head_count"), fields.get(f"{arch}.embedding_length")
    if f"{arch}.attention.key_length" not in fields and heads and width and width % heads:
        raise ForethoughtError(
            f"{source}: {arch}.attention.head_count = {heads} does not divide {arch}.embedding_length = {width}"
        )
    for key in GGUF_FLOAT_KEYS:
        full = f"{arch}.{key}"
        if full in fields:
            positive_float(fields[full], full, source, below=1.0 if "epsilon" in key else math.inf)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template", "general.name"):
        if fields.get(key) is not None and not isinstance(fields[key], str):
            raise ForethoughtError(f"{source}: {key} must be a string, got {_show(fields[key])}")
    if "tokenizer.ggml.add_bos_token" in fields and not isinstance(fields["tokenizer.ggml.add_bos_token"], bool):
        raise ForethoughtError(f"{source}: tokenizer.ggml.add_bos_token must be true or false")
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        _string_list(tokens, "tokenizer.ggml.tokens", source)
        types = fields.get("tokenizer.ggml.token_type")
        if types is not None:
            if not isinstance(types, list) or len(types) != len(tokens):
                raise ForethoughtError(f"{source}: tokenizer.ggml.token_type must list one type per token")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
                raise ForethoughtError(f"{source}: tokenizer.ggml.token_type must hold integers")
        for key in ("bos_token_id", "eos_token_id"):
            value = fields.get(f"tokenizer.ggml.{key}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ForethoughtError(f"{source}: tokenizer.ggml.{key} must be an integer, got {_show(value)}")
            if value is not None and not 0 <= value < len(tokens):
                raise ForethoughtError(f"{source}: tokenizer.ggml.{key} = {value} is not a token id")
    merges = fields.get("tokenizer.ggml.merges")
    if merges is not None:
        _string_list(merges, "tokenizer.ggml.merges", source)
        if tokens and fields.get("tokenizer.ggml.model") == "gpt2":
            bpe_vocab(tokens, merges, source)


def _string_list(value: object, field: str, source: object) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ForethoughtError(f"{source}: {field} must be a list of strings")


def bpe_vocab(tokens: list[str], merges: list[str], source: object) -> None:
    """A byte-level BPE vocabulary the `tokenizers` library can build: unique tokens, and merges of two known
    tokens into a known token (one flipped byte in a 1 MB vocabulary breaks exactly one of these)."""
    vocab = set(tokens)
    if len(vocab) != len(tokens):
        seen: set[str] = set()
        twice = next(t for t in tokens if t in seen or seen.add(t))
        raise ForethoughtError(f"{source}: the vocabulary lists the token {_show(twice)} twice")
    for i, merge in enumerate(merges):
        parts = merge.split(" ", 1)
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab or parts[0] + parts[1] not in vocab:
            raise ForethoughtError(f"{source}: merge {i} ({_show(merge)}) does not join two tokens of the vocabulary")


def hf_config(raw: Mapping[str, object], source: object) -> None:
    """Types and ranges of the config.json values the HF loader reads."""
    kind = raw.get("model_type")
    if not isinstance(kind, str):
        raise ForethoughtError(f"{source}: model_type must be a string, got {_show(kind)}")
    for key in HF_SIZE_KEYS:
        if raw.get(key) is not None:
            size(raw[key], key, source, MAX_LAYERS if key in ("n_layer", "num_hidden_layers") else MAX_SIZE)
    for heads, width in (("num_attention_heads", "hidden_size"), ("n_head", "n_embd")):
        if raw.get(heads) and raw.get(width) and raw.get("head_dim") is None and raw[width] % raw[heads]:
            raise ForethoughtError(f"{source}: {heads} = {raw[heads]} does not divide {width} = {raw[width]}")
    for key in HF_FLOAT_KEYS:
        if raw.get(key) is not None:
            positive_float(raw[key], key, source, below=1.0 if "eps" in key else math.inf)
    for key in HF_BOOL_KEYS:
        if key in raw and not isinstance(raw[key], bool):
            raise ForethoughtError(f"{source}: {key} must be true or false, got {_show(raw[key])}")
    for key in ("rope_scaling", "rope_parameters"):
        rope = raw.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ForethoughtError(f"{source}: {key} must be an object or null, got {_show(rope)}")
        if rope.get("rope_theta") is not None:
            positive_float(rope["rope_theta"], f"{key}.rope_theta", source)
    if raw.get("hidden_act") is not None and not isinstance(raw["hidden_act"], str):
        raise ForethoughtError(f"{source}: hidden_act must be a string, got {_show(raw['hidden_act'])}")
    eos = raw.get("eos_token_id")
    if eos is not None:
        ids = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ForethoughtError(f"{source}: eos_token_id must be a token id or a list of them, got {_show(eos)}")


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """The shape the config implies for every canonical tensor name (see weights/tensors.py)."""
    c = config
    d, hd = c.d_model, c.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "embed": (c.vocab_size, d),
        "unembed": (c.vocab_size, d),
        "final_norm.weight": (d,),
        "final_norm.bias": (d,),
    }
    family = c.family_spec
    if family.learned_positions:
        shapes["pos_embed"] = (c.context_length, d)
    if family.shared_memory:
        shapes |= {
            "memory.norm.weight": (d,),
            "memory.k.weight": (c.n_heads * hd, d),
            "memory.v.weight": (c.n_heads * hd, d),
            "memory.layer_logits": (c.n_layers + 1,),
        }
    if not family.has_attention:  # GRU layers
        for i in range(c.n_layers):
            p = f"blocks.{i}.gru"
            shapes |= {f"{p}.weight_ih": (3 * d, d), f"{p}.weight_hh": (3 * d, d)}
            shapes |= {f"{p}.bias_ih": (3 * d,), f"{p}.bias_hh": (3 * d,)}
        return shapes
    for i in range(c.n_layers):
        p = f"blocks.{i}"
        shapes |= {
            f"{p}.attn_norm.weight": (d,),
            f"{p}.attn_norm.bias": (d,),
            f"{p}.mlp_norm.weight": (d,),
            f"{p}.mlp_norm.bias": (d,),
            f"{p}.q.weight": (c.n_heads * hd, d),
            f"{p}.k.weight": (c.n_kv_heads * hd, d),
            f"{p}.v.weight": (c.n_kv_heads * hd, d),
            f"{p}.o.weight": (d, c.n_heads * hd),
            f"{p}.q.bias": (c.n_heads * hd,),
            f"{p}.k.bias": (c.n_kv_heads * hd,),
            f"{p}.v.bias": (c.n_kv_heads * hd,),
            f"{p}.o.bias": (d,),
            f"{p}.gate.weight": (c.d_ff, d),
            f"{p}.up.weight": (c.d_ff, d),
            f"{p}.down.weight": (d, c.d_ff),
            f"{p}.up.bias": (c.d_ff,),
            f"{p}.down.bias": (d,),
        }
    return shapes


def layer_count(config, names: Iterable[str], source: object, prefix: str = "blocks.") -> None:
    """The config's layer count equals the layers the file has tensors for (checked before a layer is built)."""
    layers = set()
    for name in names:
        if name.startswith(prefix):
            index = name[len(prefix) :].split(".", 1)[0]
            if not index.isdecimal():
                raise ForethoughtError(f"{source}: tensor {name} has no layer number")
            layers.add(int(index))
    found = max(layers) + 1 if layers else 0
    if found != config.n_layers or len(layers) != found:
        raise ForethoughtError(
            f"{source}: the config says {config.n_layers} layers, the file has tensors for layers "
            f"{sorted(layers)[:3]}{'...' if len(layers) > 3 else ''} ({len(layers)} in all)"
        )


def tensors(config, weights: Mapping[str, torch.Tensor], source: object = "the model file") -> None:
    """Canonical tensors against the config, before the model is built: the layer count, every known tensor's
    shape (so no size in the config exceeds what the file holds), and finite values."""
    layer_count(config, weights, source)
    shapes = expected_shapes(config)
    for name, w in weights.items():
        want = shapes.get(name)
        if name == "pos_embed" and want is not None and w.ndim == 2 and w.shape[0] >= want[0]:
            want = (w.shape[0], want[1])  # GPT-2 files may hold more positions than the config uses
        if want is not None and tuple(w.shape) != want:
            raise ForethoughtError(f"{source}: tensor {name} has shape {tuple(w.shape)}, the config implies {want}")
        if want is not None and not w.is_floating_point():  # an integer or bool tensor is no trained weight
            raise ForethoughtError(f"{source}: tensor {name} must hold floating-point values, got {w.dtype}")
        # A finite sum proves every value finite (NaN and inf propagate) at a fraction of isfinite's cost.
        if w.is_floating_point() and not bool(torch.isfinite(w.sum())) and not bool(torch.isfinite(w).all()):
            raise ForethoughtError(f"{source}: tensor {name} holds NaN or infinite values")


def tokenizer(tok, config, source: object) -> None:
    """Every id the tokenizer can produce indexes the embedding."""
    if tok.vocab_size > config.vocab_size:
        raise ForethoughtError(
            f"{source}: the tokenizer has {tok.vocab_size} tokens but the embedding only {config.vocab_size} rows"
        )
    # A vocabulary's ids need not be 0..n-1: a word-level tokenizer of 3 words may map one of them to 99.
    largest = max(tok.backend.get_vocab(with_added_tokens=True).values(), default=-1)
    if largest >= config.vocab_size:
        raise ForethoughtError(
            f"{source}: the tokenizer has a token id {largest}, outside the embedding's {config.vocab_size} rows"
        )
    for label, value in (("bos", tok.bos_id), ("eos", tok.eos_id)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ForethoughtError(f"{source}: the {label} token id must be an integer, got {_show(value)}")
        if value is not None and not 0 <= value < config.vocab_size:
            raise ForethoughtError(f"{source}: the {label} token id {value} is outside the vocabulary")


def generation_eos(raw: object, source: object) -> None:
    """generation_config.json's eos_token_id: a token id or a non-empty list of them (HF writes both), never a
    string, bool or float, which would otherwise reach the tokenizer as its stop token."""
    if not isinstance(raw, dict):
        raise ForethoughtError(f"{source}: generation_config.json must hold a JSON object, got {_show(raw)}")
    eos = raw.get("eos_token_id")
    if eos is None:
        return
    ids = eos if isinstance(eos, list) else [eos]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ForethoughtError(
            f"{source}: generation_config.json eos_token_id must be a token id or a list of them, got {_show(eos)}"
        )


# GGUF tensor names -> canonical names, for checking shapes from the tensor index before dequantizing.
_GGUF_GLOBAL = {"token_embd.weight": "embed", "output.weight": "unembed", "position_embd.weight": "pos_embed"}
_GGUF_BLOCK = {
    "attn_norm": "attn_norm",
    "ffn_norm": "mlp_norm",
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
}


def gguf_tensor_index(config, infos, source: object) -> None:
    """The GGUF tensor index against the config, before a byte is dequantized: the layer count, and the shape of
    every tensor whose shape the config implies (names of other kinds are left to the loader)."""
    layer_count(config, (t.name for t in infos), source, prefix="blk.")
    shapes = expected_shapes(config)
    for t in infos:
        if t.name in _GGUF_GLOBAL:
            canonical = _GGUF_GLOBAL[t.name]
        elif t.name.startswith("output_norm."):
            canonical = "final_norm." + t.name.split(".", 1)[1]
        elif t.name.startswith("blk.") and t.name.count(".") == 3:
            _, layer, kind, leaf = t.name.split(".")
            canonical = f"blocks.{layer}.{_GGUF_BLOCK.get(kind, kind)}.{leaf}"
            if kind == "attn_qkv":  # GPT-2's fused Q, K, V
                q, k = shapes.get(f"blocks.{layer}.q.{leaf}"), shapes.get(f"blocks.{layer}.k.{leaf}")
                if q is None or k is None:
                    continue
                want = (q[0] + 2 * k[0], *q[1:])
                if t.shape != want:
                    raise ForethoughtError(f"{source}: tensor {t.name} has shape {t.shape}, the config implies {want}")
                continue
        elif t.name.startswith("blk."):
            raise ForethoughtError(f"{source}: unexpected tensor name {_show(t.name)}")
        else:
            continue
        want = shapes.get(canonical)
        if canonical == "pos_embed" and want is not None and len(t.shape) == 2 and t.shape[0] >= want[0]:
            want = (t.shape[0], want[1])
        if want is not None and t.shape != want:
            raise ForethoughtError(f"{source}: tensor {t.name} has shape {t.shape}, the config implies {want}")


# --- the architectures lab's model folders (arch/export.py) -----------------------------------------------------

# model_type -> the engine family its tensors are for; `forethought_arch.arch` -> the family it must run as
LAB_MODEL_TYPES = {
    "llama": "llama",
    "forethought_llama": "llama",
    "forethought_feedback": "feedback",
    "forethought_recurrent": "recurrent",
}
LAB_ARCH_FAMILIES = {"standard": "llama", "myopic": "llama", "feedback": "feedback", "recurrent": "recurrent"}


def lab_config(raw: Mapping[str, object], source: object) -> None:
    """The lab's own keys in config.json: what it was trained as agrees with the family it is labelled."""
    kind = raw.get("model_type")
    lab = raw.get("forethought_arch")
    if lab is None:
        if isinstance(kind, str) and kind.startswith("forethought_"):
            raise ForethoughtError(f"{source}: a {kind} folder must say what it was trained as (forethought_arch)")
        return
    if not isinstance(lab, dict) or not isinstance(lab.get("arch"), str) or not isinstance(lab.get("task"), dict):
        raise ForethoughtError(f"{source}: forethought_arch must be an object with an arch name and a task object")
    family = LAB_ARCH_FAMILIES.get(lab["arch"])
    if family is None:
        raise ForethoughtError(f"{source}: forethought_arch.arch {_show(lab['arch'])} is not a lab architecture")
    if LAB_MODEL_TYPES.get(kind) != family:
        raise ForethoughtError(f"{source}: a {lab['arch']} model cannot be a {_show(kind)} folder")
    if "use_rope" in raw:
        if not isinstance(raw["use_rope"], bool):
            raise ForethoughtError(f"{source}: use_rope must be true or false, got {_show(raw['use_rope'])}")
        from forethought.model.families import family_of

        if not family_of(family).has_attention:  # a GRU: nothing attends, so there are no positions to rotate
            raise ForethoughtError(f"{source}: use_rope does not apply to a GRU (it has no positions to encode)")


def lab_tensor_names(config) -> set[str]:
    """The canonical tensors a lab model of this family is made of, all of them and nothing else."""
    spec = config.family_spec
    names = {"embed", "unembed", "final_norm.weight", *spec.lab_model_tensors}
    for i in range(config.n_layers):
        names |= {f"blocks.{i}.{leaf}" for leaf in spec.lab_block_tensors}
    return names


def lab_tensors(config, names: Iterable[str], source: object) -> None:
    """A lab folder holds exactly its family's tensors: a feedback model labelled recurrent is refused here."""
    have, want = set(names), lab_tensor_names(config)
    if have != want:
        odd, missing = sorted(have - want), sorted(want - have)
        family = config.family
        if odd:
            raise ForethoughtError(f"{source}: tensor {_show(odd[0])} is not part of a {family} model (mislabelled?)")
        raise ForethoughtError(f"{source}: lacks the tensor {_show(missing[0])} of a {family} model")


# --- folders written whole by the architectures lab (arch/checkpoint.py) ---------------------------------------

MANIFEST = "manifest.json"  # the sha256 of every other file in the folder, written last


def sha256(path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(folder, files: Mapping[str, str], what: str) -> None:
    """Every file listed is in `folder` with its sha256, and no other file is (besides the manifest)."""
    if not folder.is_dir():
        raise ForethoughtError(f"{folder}: the {what} folder is missing")
    extra = sorted({p.name for p in folder.iterdir()} - set(files) - {MANIFEST})
    if extra:
        raise ForethoughtError(f"{folder}: {_show(extra[0])} is not part of the {what}")
    for name, digest in files.items():
        path = folder / name
        if "/" in name or name in (".", "..") or not path.is_file():
            raise ForethoughtError(f"{folder}: {_show(name)} of the {what} is missing")
        if sha256(path) != digest:
            raise ForethoughtError(f"{path} does not match its sha256 in the {what}'s manifest (damaged)")


def folder_manifest(folder) -> None:
    """A folder with a manifest.json (the lab's exported models): every file matches it. Without one, nothing
    to check here (folders from elsewhere have none)."""
    import json

    path = folder / MANIFEST
    if not path.exists():
        return
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ForethoughtError(f"{path}: unreadable manifest ({e.__class__.__name__})") from None
    files = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ForethoughtError(f"{path}: not a manifest this version writes")
    verify_files(folder, files, "model folder")
