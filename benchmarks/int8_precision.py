"""How far int8 decoding moves the model's next-token distribution from float32:
`python -m benchmarks.int8_precision [--models A,B] [--tokens N]`.

For each model: float32 logits of a text in one forward (the reference), then the same text fed token by token
through the int8 model's decode path (the compiled step and its int8 products, as `generate` runs them), and per
position the KL divergence from the reference and whether the argmax agrees. Prints the mean KL and the agreement,
and the same for llama.cpp's Q8_0 against its F32 (conversions of the same file, the same token ids) where
llama-cpp-python is installed: the peer the int8 speed bar compares with, at its own precision.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from forethought import load_model

TEXT_FILE = Path(__file__).resolve().parent.parent / "README.md"


def divergence(model_ref: str, ref: torch.Tensor, logp: torch.Tensor) -> dict:
    """Mean KL(ref || logp) over positions and how often their argmaxes agree (log-probabilities [T, vocab])."""
    kl = (ref.exp() * (ref - logp)).sum(-1)
    return {
        "model": model_ref,
        "tokens": ref.shape[0],
        "mean_kl": kl.mean().item(),
        "argmax_agreement": (logp.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


@torch.inference_mode()
def measure(model_ref: str, tokens: int) -> tuple[dict, list[int]]:
    """forethought's int8 decode path against its float32 forward, and the token ids it read."""
    reference = load_model(model_ref)
    ids = reference.tokenizer.encode(TEXT_FILE.read_text()[:4000])[:tokens]
    ref = reference.model(torch.tensor([ids])).log_softmax(-1)[0]
    del reference
    quantized = load_model(model_ref, dtype="int8").model
    cache = quantized.new_cache(len(ids))
    rows = [quantized(torch.tensor([[t]]), cache=cache)[0, -1] for t in ids]
    return divergence(model_ref, ref, torch.stack(rows).log_softmax(-1)), ids


def peer(model_ref: str, ids: list[int]) -> dict | None:
    """llama.cpp's Q8_0 conversion against its F32 conversion of the model's file, every position's logits
    for the token ids forethought read (None without llama-cpp-python)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    import numpy as np

    from benchmarks.common import llama
    from benchmarks.ladder_speed import llama_file

    def log_probs(kind: str) -> torch.Tensor:
        llm = llama(llama_file(model_ref, kind), n_ctx=max(256, len(ids)), logits_all=True, n_batch=len(ids))
        llm.eval(ids)
        scores = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float64))
        llm.close()
        return scores.log_softmax(-1)

    return divergence(model_ref, log_probs("F32"), log_probs("Q8_0"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    parser.add_argument("--tokens", type=int, default=640)
    args = parser.parse_args()
    for model_ref in args.models.split(","):
        r, ids = measure(model_ref, args.tokens)
        print(
            f"{r['model']}: int8 decode path vs float32 over {r['tokens']} tokens of README.md: "
            f"argmax agreement {r['argmax_agreement']:.3f}, mean KL {r['mean_kl']:.2e}",
            flush=True,
        )
        q8 = peer(model_ref, ids)
        if q8 is not None:
            print(
                f"{q8['model']}: llama.cpp Q8_0 vs its F32, the same {q8['tokens']} tokens: "
                f"argmax agreement {q8['argmax_agreement']:.3f}, mean KL {q8['mean_kl']:.2e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
