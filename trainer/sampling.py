"""Text generation from a checkpoint, written once for both backends.

python -m backend_torch.sample and python -m backend_mlx.sample parse the same settings, load the
checkpoint and its tokenizer, and run the same loop; a backend only supplies `last_logits(ids,
caches)`: the logits of the last position of `ids` (numpy, shape (V,)), its GPT advancing the
per-layer key/value caches it is given. KVCacheDecoder turns that into the two calls the loop
makes: prefill(prompt ids) once, then step(token) once per new token.

Tokens are chosen here, on the host, in numpy float64, from a numpy PCG64 generator: given the same
logits and seed both backends pick the same tokens.
  - TEMPERATURE=0 (default): greedy, the argmax (ties go to the lower id).
  - TEMPERATURE>0: softmax(logits / temperature) restricted to the TOP_K largest logits (0 = all),
    sampled by inverse CDF with one uniform draw per token.

The prompt is encoded as training documents are: BOS (id 1), then the tokenizer's ids of the text,
with no dummy prefix (twingpt's tokenizers, like Parameter Golf's, add none; one that does is
refused). An empty prompt means BOS alone: the model starts a document of its own. Generation stops
after MAX_NEW_TOKENS tokens, or at EOS (id 2) or BOS (id 1): documents in the shards end only where
the next one begins with BOS, so a generated BOS is the model ending its document.

Settings: command-line flag > environment variable > default, like the trainers'.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from core.checkpoint import Checkpoint, load_checkpoint
from core.config import env_name, parse_settings, setting
from core.errors import CheckpointError, ConfigError, DatasetError

BOS_ID = 1
EOS_ID = 2
STOP_IDS = (EOS_ID, BOS_ID)


@dataclass(frozen=True)
class SampleSettings:
    """Every setting of a sampling run. Field `top_k` is env TOP_K and flag --top-k."""

    checkpoint: str = setting("", "checkpoint (.safetensors) to sample from "
                               "(empty: the newest runs/*/checkpoints/*.safetensors)")
    prompt: str = setting("", "text to continue (empty: start from BOS alone, a new document)")
    max_new_tokens: int = setting(200, "stop after this many new tokens")
    temperature: float = setting(0.0, "0 = greedy (argmax); above 0, sample from softmax(logits/temperature)")
    top_k: int = setting(0, "sample only among the k most likely tokens (0 = all; ignored when greedy)")
    seed: int = setting(1337, "seed of the sampling generator (numpy PCG64)")
    tokenizer_path: str = setting("", "SentencePiece model (empty: the one of the checkpoint's dataset)")

    def __post_init__(self):
        for name in ("max_new_tokens", "top_k", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{env_name(name)}={getattr(self, name)}: must not be negative")
        if self.temperature < 0:
            raise ConfigError(f"TEMPERATURE={self.temperature}: must not be negative (0 = greedy)")


def parse_sample_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                          prog: str | None = None) -> SampleSettings:
    """SampleSettings from flags > environment > defaults. `--help` prints every setting and exits."""
    return parse_settings(SampleSettings, argv, environ, prog, description="Continue a prompt with a twingpt checkpoint.")


# ---------------------------------------------------------------------------------------------
# Choosing tokens
# ---------------------------------------------------------------------------------------------

def select_token(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """The next token from last-position logits (V,): greedy when temperature is 0, else sampled."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(z))  # the first maximum
    z = z / temperature
    order = np.argsort(-z, kind="stable")  # most likely first; equal logits keep the lower id first
    if 0 < top_k < z.size:
        order = order[:top_k]
    weights = np.exp(z[order] - z[order[0]])  # unnormalized softmax of the kept logits, max = 1
    cdf = np.cumsum(weights)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(order[min(i, order.size - 1)])  # min(): guards u*total rounding onto the last edge


LastLogits = Callable[[np.ndarray, list], np.ndarray]  # ((1, T) int64 ids, caches) -> (V,) logits


class KVCacheDecoder:
    """prefill/step over a GPT's logits(ids, caches): one cache dict per block call (per layer, and
    per pass of a looped layer), whose "offset" (the number of positions already cached) the caller
    advances after each call.

    `exact_len`: the longest sequence whose cached keys stay exact. With ROPE_YARN (docs/spec.md §4.2)
    a sequence longer than ROPE_TRAIN_SEQ_LEN rotates every position with a larger base, so past it
    each call recomputes the whole sequence from an empty cache."""

    def __init__(self, last_logits: LastLogits, num_layers: int, exact_len: int | None = None):
        self.last_logits = last_logits
        self.num_layers = num_layers
        self.exact_len = exact_len
        self.caches: list[dict] = []
        self.ids = np.zeros(0, dtype=np.int64)

    def _run(self, ids: np.ndarray) -> np.ndarray:
        self.ids = np.concatenate((self.ids, ids))
        if self.exact_len is not None and self.ids.size > self.exact_len:
            self.caches, ids = [{"offset": 0} for _ in range(self.num_layers)], self.ids
        out = self.last_logits(ids[None, :], self.caches)
        for cache in self.caches:
            cache["offset"] += ids.size
        return out

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        self.caches = [{"offset": 0} for _ in range(self.num_layers)]
        self.ids = np.zeros(0, dtype=np.int64)
        return self._run(np.asarray(ids, dtype=np.int64))

    def step(self, token: int) -> np.ndarray:
        return self._run(np.array([token], dtype=np.int64))


def kv_decoder(spec, last_logits: LastLogits, looping: bool = False) -> KVCacheDecoder:
    """The cached decoder of a model of `spec` (exact past ROPE_TRAIN_SEQ_LEN under ROPE_YARN too);
    one cache per block call, so a looped block has one per pass (docs/spec.md §4.10)."""
    return KVCacheDecoder(last_logits, spec.block_calls(looping),
                          exact_len=spec.rope_train_seq_len if spec.rope_yarn else None)


def generate(decoder, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0) -> list[int]:
    """New token ids after prompt_ids: `decoder.prefill(ids)` and `decoder.step(token)` each return
    the logits of the next position. The list ends with the stop token (EOS or BOS) if one came."""
    rng = np.random.Generator(np.random.PCG64(seed))
    new: list[int] = []
    if max_new_tokens == 0:
        return new
    logits = decoder.prefill(list(prompt_ids))
    while True:
        if not np.all(np.isfinite(logits)):
            raise CheckpointError("the model produced non-finite logits: its weights hold NaN or inf")
        token = select_token(logits, temperature, top_k, rng)
        new.append(token)
        if token in STOP_IDS or len(new) == max_new_tokens:
            return new
        logits = decoder.step(token)


# ---------------------------------------------------------------------------------------------
# Checkpoint, tokenizer, prompt
# ---------------------------------------------------------------------------------------------

def newest_checkpoint(runs: Path = Path("runs")) -> Path:
    found = sorted(runs.glob("*/checkpoints/*.safetensors"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"CHECKPOINT is not set and {runs}/ holds no checkpoint: train one (make train) "
                          "or set CHECKPOINT=path/to/step_NNNNNN.safetensors")
    return found[-1]


def load_tokenizer_for(ckpt: Checkpoint, tokenizer_path: str = ""):
    """TOKENIZER_PATH when given, else the tokenizer of the dataset the checkpoint was trained on;
    its vocabulary must be the checkpoint's."""
    from data.datasets import resolve_dataset
    from data.tokenizer import load_tokenizer

    vocab = ckpt.spec.vocab_size
    if tokenizer_path:
        path, label = tokenizer_path, f"TOKENIZER_PATH={tokenizer_path}"
    else:
        cfg = ckpt.config
        data_path, cfg_tokenizer = str(cfg.get("data_path") or ""), str(cfg.get("tokenizer_path") or "")
        if cfg_tokenizer and Path(cfg_tokenizer).is_file():
            path = cfg_tokenizer  # named by the run itself: no need for its dataset to still be there
        else:
            try:
                path = resolve_dataset(data_path, cfg_tokenizer, vocab, check_tokens=False).tokenizer_path
            except DatasetError as e:
                raise DatasetError(f"finding the tokenizer of checkpoint {ckpt.path}: {e} "
                                   "(set TOKENIZER_PATH to name it)") from None
        label = f"tokenizer {path}"
    sp = load_tokenizer(path)
    if sp.vocab_size() != vocab:
        raise DatasetError(f"{label} has vocabulary size {sp.vocab_size()}, "
                           f"but checkpoint {ckpt.path} has vocab_size={vocab}")
    if sp.bos_id() != BOS_ID:
        raise DatasetError(f"{label} has BOS id {sp.bos_id()}; twingpt documents begin with BOS id {BOS_ID}")
    if sp.encode("a", out_type=str)[0].startswith("\u2581"):
        raise DatasetError(f"{label} adds a dummy prefix (a leading space); twingpt tokenizers add none")
    return sp


def encode_prompt(sp, prompt: str) -> list[int]:
    """BOS, then the prompt's ids: the start of a training document."""
    return [BOS_ID] + (sp.encode(prompt) if prompt else [])


def decode(sp, ids: Sequence[int]) -> str:
    """Text of the ids, BOS/EOS dropped (their pieces are control symbols with no text)."""
    return sp.decode([int(t) for t in ids if t not in STOP_IDS])


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

@dataclass
class SampleResult:
    checkpoint: Path
    prompt_ids: list[int]
    new_ids: list[int]
    text: str            # prompt + continuation
    seconds: float


def run_sampling(settings: SampleSettings, make_last_logits: Callable, backend: str = "",
                 out=None, err=None) -> SampleResult:
    """Load, generate, print the text on `out` (stdout) and one summary line on `err` (stderr).

    `make_last_logits(spec, weights, looping=...)` builds the backend's model and returns its LastLogits; it is
    called only once the checkpoint, tokenizer and prompt are known to be good.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    path = Path(settings.checkpoint) if settings.checkpoint else newest_checkpoint()
    ckpt = load_checkpoint(path)
    sp = load_tokenizer_for(ckpt, settings.tokenizer_path)
    prompt_ids = encode_prompt(sp, settings.prompt)
    decoder = kv_decoder(ckpt.spec, make_last_logits(ckpt.spec, ckpt.weights, looping=ckpt.looping), ckpt.looping)
    start = time.perf_counter()
    new_ids = generate(decoder, prompt_ids, settings.max_new_tokens, settings.temperature,
                       settings.top_k, settings.seed)
    seconds = time.perf_counter() - start
    text = decode(sp, prompt_ids + new_ids)
    print(text, file=out, flush=True)
    stop = {EOS_ID: "eos", BOS_ID: "bos"}.get(new_ids[-1] if new_ids else None, "max_new_tokens")
    mode = "greedy" if settings.temperature == 0 else (
        f"temperature:{settings.temperature:g} top_k:{settings.top_k} seed:{settings.seed}")
    print(f"sample backend:{backend} checkpoint:{path} step:{ckpt.step} prompt_tokens:{len(prompt_ids)} "
          f"new_tokens:{len(new_ids)} stop:{stop} {mode} "
          f"{len(new_ids) / max(seconds, 1e-9):.1f} tokens/s", file=err, flush=True)
    return SampleResult(path, prompt_ids, new_ids, text, seconds)
