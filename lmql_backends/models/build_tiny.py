"""Build the embedded tiny default model (``builtin:tiny``) from a public-domain corpus.

The result is a very small GPT-2 style causal language model plus a byte-level
BPE tokenizer, saved in the ordinary ``transformers`` layout so that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``
load it from a local directory with no network access.  It exists so that the
package and its tests always have a real model to run; it writes recognisable
English words, not sensible text.

Corpus
------
Jane Austen's six completed novels ("Sense and Sensibility", "Pride and
Prejudice", "Mansfield Park", "Emma", "Northanger Abbey", "Persuasion"; about
4.3 MB of text, Project Gutenberg transcriptions).  The novels were published
1811-1818 and are in the public domain; the R packaging around them is MIT
licensed (Julia Silge), see ``/usr/share/doc/r-cran-janeaustenr/copyright``.

They come from the Debian package ``r-cran-janeaustenr`` (version 1.0.0-1),
which stores them as R "lazy-load" data in the file::

    /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb

This script reads that file directly (see :func:`read_rdb_strings`), so R itself
is not needed.  Either install the package (this also pulls in R)::

    apt-get update && apt-get install -y r-cran-janeaustenr

or only unpack it, without installing R::

    apt-get update && cd /tmp && apt-get download r-cran-janeaustenr
    dpkg -x r-cran-janeaustenr_*.deb /tmp/janeaustenr
    # corpus: /tmp/janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb

``--corpus`` also accepts any plain ``.txt`` file, or a directory searched
recursively for ``*.txt`` and ``*.rdb`` files.  The corpus is not stored in the
repository.

Build
-----
::

    python -m lmql_backends.models.build_tiny --out lmql_backends/models/tiny \\
        --corpus /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb

Every random choice is seeded (``--seed``) and training runs a fixed number of
steps, so a rerun on the same library versions gives the same model (up to
floating-point differences between machines): two runs here gave bit-identical
weights.  ``--corpus`` defaults to the installed path above.  The whole build
takes about 10 minutes of wall time on two CPU cores (~14 minutes of CPU time).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIAL_TOKEN = "<|endoftext|>"
DEFAULT_CORPUS = "/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
MODEL_NAME = "builtin:tiny"
# No token_type_ids: GPT-2 would add the embedding of token 0 to every position.
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]


@dataclass(frozen=True)
class BuildOptions:
    """Every knob of a build; all of them are recorded in the model card."""

    corpus: str = DEFAULT_CORPUS
    out: str = "lmql_backends/models/tiny"
    seed: int = 1234
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 1024
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 720
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    bos_start_fraction: float = 0.5
    threads: int = 2


# --------------------------------------------------------------------------
# Reading the corpus
# --------------------------------------------------------------------------


class _XdrReader:
    """Reads the few pieces of R's XDR serialization format that the corpus needs."""

    STRSXP = 16
    LATIN1 = 1 << 2

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int) -> bytes:
        """Return the next `count` bytes."""
        chunk = self.data[self.pos : self.pos + count]
        if len(chunk) != count:
            raise ValueError("truncated R serialization")
        self.pos += count
        return chunk

    def int(self) -> int:
        """Return the next big-endian signed 32-bit integer."""
        return struct.unpack(">i", self.take(4))[0]

    def header(self) -> None:
        """Skip the stream header (format, versions and, in version 3, the encoding)."""
        if self.take(2) != b"X\n":
            raise ValueError("not an XDR R serialization")
        version = self.int()
        self.int()  # version of R that wrote it
        self.int()  # oldest version of R that can read it
        if version == 3:
            self.take(self.int())

    def string(self) -> str | None:
        """Return one CHARSXP element (None for NA)."""
        flags = self.int()
        length = self.int()
        if length == -1:
            return None
        raw = self.take(length)
        return raw.decode("latin-1" if (flags >> 12) & self.LATIN1 else "utf-8")

    def character_vector(self) -> list[str] | None:
        """Return the top-level object if it is a character vector, else None."""
        flags = self.int()
        if flags & 0xFF != self.STRSXP:
            return None
        length = self.int()
        return [s or "" for s in (self.string() for _ in range(length))]


def _rdb_blobs(data: bytes):
    """Yield each decompressed object of an R lazy-load database (``.rdb``).

    Each object is stored as a 4-byte big-endian uncompressed length followed by
    a zlib stream; the objects follow each other with no gaps.
    """
    pos = 0
    while pos < len(data):
        expected = struct.unpack(">I", data[pos : pos + 4])[0]
        inflater = zlib.decompressobj()
        blob = inflater.decompress(data[pos + 4 :])
        if len(blob) != expected:
            raise ValueError("corrupt .rdb entry (only zlib-compressed entries are supported)")
        pos = len(data) - len(inflater.unused_data)
        yield blob


def read_rdb_strings(path: Path) -> list[list[str]]:
    """Return every character vector stored in an R ``.rdb`` file (one per novel)."""
    vectors = []
    for blob in _rdb_blobs(path.read_bytes()):
        reader = _XdrReader(blob)
        reader.header()
        vector = reader.character_vector()
        if vector is not None:
            vectors.append(vector)
    return vectors


def clean_paragraph(text: str) -> str:
    """Undo Gutenberg plain-text conventions: hard wrapping and ``_italics_``."""
    text = text.replace("_", "")
    return re.sub(r"\s+", " ", text).strip()


def paragraphs_from_lines(lines: list[str]) -> list[str]:
    """Join hard-wrapped lines into paragraphs, split at blank lines."""
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(clean_paragraph(" ".join(current)))
            current = []
    return [p for p in paragraphs if p]


def corpus_files(path: Path) -> list[Path]:
    """Return the corpus files named by `path` (a file, or a directory searched recursively)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".rdb") and p.is_file())
        if files:
            return files
    raise FileNotFoundError(f"no corpus at {path}: see this module's docstring for how to get one")


def read_corpus(path: Path) -> list[str]:
    """Return the corpus as a list of paragraphs; each one becomes a training document."""
    paragraphs = []
    for file in corpus_files(path):
        if file.suffix == ".rdb":
            for lines in read_rdb_strings(file):
                paragraphs += paragraphs_from_lines(lines)
        else:
            paragraphs += paragraphs_from_lines(file.read_text(encoding="utf-8").splitlines())
    if not paragraphs:
        raise ValueError(f"corpus {path} holds no text")
    return paragraphs


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def train_tokenizer(paragraphs: list[str], vocab_size: int):
    """Train a GPT-2 style byte-level BPE tokenizer whose id 0 is ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(paragraphs, trainer=trainer, length=len(paragraphs))
    return tokenizer


def wrap_tokenizer(tokenizer, max_length: int):
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer that adds no BOS."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        model_max_length=max_length,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_input_names=MODEL_INPUT_NAMES,
    )


# --------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------


def encode_documents(tokenizer, paragraphs: list[str], bos_id: int) -> torch.Tensor:
    """Encode the corpus as one token stream: ``<|endoftext|>`` before every paragraph."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(paragraphs):
        ids.append(bos_id)
        ids.extend(encoding.ids)
    ids.append(bos_id)
    return torch.tensor(ids, dtype=torch.long)


class BatchSampler:
    """Draws training windows from the token stream; some of them start at a BOS token."""

    def __init__(self, stream: torch.Tensor, bos_id: int, opts: BuildOptions) -> None:
        self.stream = stream
        self.seq_len = opts.seq_len
        self.batch_size = opts.batch_size
        self.bos_fraction = opts.bos_start_fraction
        last_start = len(stream) - opts.seq_len - 1
        if last_start <= 0:
            raise ValueError("corpus is shorter than one training sequence")
        self.last_start = last_start
        bos = (stream[: last_start + 1] == bos_id).nonzero().flatten()
        self.bos_starts = bos
        self.rng = torch.Generator().manual_seed(opts.seed)

    def _starts(self) -> torch.Tensor:
        """Pick window starts: a share at document starts, the rest anywhere."""
        n_bos = round(self.batch_size * self.bos_fraction)
        picks = torch.randint(len(self.bos_starts), (n_bos,), generator=self.rng)
        anywhere = torch.randint(self.last_start + 1, (self.batch_size - n_bos,), generator=self.rng)
        return torch.cat([self.bos_starts[picks], anywhere])

    def batch(self) -> torch.Tensor:
        """Return a ``(batch_size, seq_len + 1)`` tensor of token ids."""
        offsets = torch.arange(self.seq_len + 1)
        return self.stream[self._starts()[:, None] + offsets[None, :]]


# --------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------


def build_model(opts: BuildOptions, vocab_size: int, bos_id: int, eos_id: int):
    """Create a freshly initialised GPT-2 model (seeded by the caller)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=opts.n_positions,
        n_embd=opts.n_embd,
        n_layer=opts.n_layer,
        n_head=opts.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def learning_rate(step: int, opts: BuildOptions) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak rate."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    return opts.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, opts: BuildOptions) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases and layer norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": opts.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.95))


def train_step(model, optimizer, batch: torch.Tensor, lr: float) -> float:
    """Run one optimisation step on `batch` and return its loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def train(model, sampler: BatchSampler, opts: BuildOptions) -> dict:
    """Train for ``opts.steps`` steps; return the loss history and timing."""
    model.train()
    optimizer = make_optimizer(model, opts)
    losses: list[float] = []
    started, cpu_started = time.monotonic(), time.process_time()
    for step in range(opts.steps):
        losses.append(train_step(model, optimizer, sampler.batch(), learning_rate(step, opts)))
        if step % 50 == 0 or step == opts.steps - 1:
            elapsed = time.monotonic() - started
            print(f"step {step:5d}  loss {losses[-1]:.3f}  {elapsed:6.1f}s", flush=True)
    model.eval()
    tail = losses[-50:]
    return {
        "final_loss": sum(tail) / len(tail),
        "first_loss": losses[0],
        "train_seconds": time.monotonic() - started,
        "train_cpu_seconds": time.process_time() - cpu_started,
    }


# --------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------


def greedy_sample(model, tokenizer, prompt: str, new_tokens: int = 20) -> str:
    """Return the greedy continuation of `prompt` (which may start with the BOS token)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs.input_ids.shape[1] :])


def write_model_card(out: Path, opts: BuildOptions, stats: dict) -> None:
    """Write ``README.md``, the model card of the built model."""
    samples = "\n".join(f"    {p!r} -> {s!r}" for p, s in stats["samples"].items())
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.name != "README.md")
    card = f"""# `{MODEL_NAME}`: the embedded tiny default model

A very small GPT-2 style causal language model with its own byte-level BPE
tokenizer, shipped inside `lmql_backends` so that the package and its tests
always have a real model to load with no network access. The loader resolves
the reserved model name `{MODEL_NAME}` to this directory. It writes recognisable
English words, not sensible text: use it for testing, never for real answers.

## Architecture

- `GPT2LMHeadModel`, {opts.n_layer} layers, {opts.n_head} heads, hidden size {opts.n_embd},
  {opts.n_positions} positions (trained on sequences of {opts.seq_len} tokens),
  tied input/output embeddings, {stats["parameters"]:,} parameters, float32 safetensors.
- Byte-level BPE tokenizer (`tokenizers`), vocabulary {stats["vocab_size"]} tokens.
  `{SPECIAL_TOKEN}` (id {stats["bos_id"]}) is BOS, EOS and UNK, as in GPT-2; the tokenizer
  does not add it by itself, so prompts start with it explicitly.
- Size of the model and tokenizer files: {size / 1e6:.1f} MB.

## Corpus and licence

Jane Austen's six completed novels (Sense and Sensibility, Pride and Prejudice,
Mansfield Park, Emma, Northanger Abbey, Persuasion), Project Gutenberg
transcriptions published 1811-1818 and in the **public domain**. They were read
from the Debian package `r-cran-janeaustenr` (1.0.0-1; its R packaging is MIT
licensed), file `/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb`.
{stats["paragraphs"]:,} paragraphs, {stats["tokens"]:,} tokens; each paragraph is one
document, preceded by `{SPECIAL_TOKEN}`. The corpus is not stored here.

## How it was built

`lmql_backends/models/build_tiny.py` (its docstring says how to get the corpus):

    python -m lmql_backends.models.build_tiny --out {opts.out} --corpus {opts.corpus}

Seed {opts.seed}; AdamW (peak learning rate {opts.lr}, warm-up {opts.warmup} steps,
cosine decay, weight decay {opts.weight_decay}); {opts.steps} steps of
{opts.batch_size} x {opts.seq_len} tokens, {round(opts.bos_start_fraction * 100)}% of
the sequences starting at `{SPECIAL_TOKEN}`; `torch.set_num_threads({opts.threads})`.
Built with torch {torch.__version__}, transformers {stats["transformers"]},
tokenizers {stats["tokenizers"]}.

- Training time: {stats["train_seconds"]:.0f} s wall clock, {stats["train_cpu_seconds"]:.0f} s of CPU time
  (on a shared 2-core machine).
- Training loss: {stats["first_loss"]:.2f} at the start, **{stats["final_loss"]:.2f}** at the end
  (mean of the last 50 steps).

## Greedy samples (20 new tokens)

{samples}
"""
    (out / "README.md").write_text(card, encoding="utf-8")


def make_tokenizer_config_portable(out: Path) -> None:
    """Name the tokenizer class in a way both transformers 4 and 5 understand.

    transformers 5 records its own ``TokenizersBackend`` class, which version 4
    does not know; ``PreTrainedTokenizerFast`` loads the same files in both.
    It also records that no BOS or EOS token is added automatically and that
    the model takes no ``token_type_ids`` (transformers 4 would otherwise
    return them, and GPT-2 would add the embedding of token 0 to every position).
    """
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        add_bos_token=False,
        add_eos_token=False,
        model_input_names=MODEL_INPUT_NAMES,
    )
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_all(model, tokenizer, out: Path) -> None:
    """Save the model (safetensors), its generation config and the tokenizer to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    make_tokenizer_config_portable(out)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def parse_args(argv=None) -> BuildOptions:
    """Turn the command line into :class:`BuildOptions`."""
    defaults = BuildOptions()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in vars(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    return BuildOptions(**vars(parser.parse_args(argv)))


def build(opts: BuildOptions) -> dict:
    """Run the whole build and return the statistics written to the model card."""
    import tokenizers
    import transformers

    torch.manual_seed(opts.seed)
    torch.set_num_threads(opts.threads)
    paragraphs = read_corpus(Path(opts.corpus))
    raw_tokenizer = train_tokenizer(paragraphs, opts.vocab_size)
    bos_id = raw_tokenizer.token_to_id(SPECIAL_TOKEN)
    stream = encode_documents(raw_tokenizer, paragraphs, bos_id)
    tokenizer = wrap_tokenizer(raw_tokenizer, opts.n_positions)
    model = build_model(opts, raw_tokenizer.get_vocab_size(), bos_id, bos_id)
    print(f"{len(paragraphs)} paragraphs, {len(stream)} tokens, "
          f"{model.num_parameters()} parameters", flush=True)
    stats = train(model, BatchSampler(stream, bos_id, opts), opts)
    out = Path(opts.out)
    save_all(model, tokenizer, out)
    prompts = [SPECIAL_TOKEN + "Hello", SPECIAL_TOKEN + "The man", SPECIAL_TOKEN + "It was"]
    stats.update(
        samples={p: greedy_sample(model, tokenizer, p) for p in prompts},
        parameters=model.num_parameters(),
        vocab_size=raw_tokenizer.get_vocab_size(),
        bos_id=bos_id,
        paragraphs=len(paragraphs),
        tokens=len(stream),
        transformers=transformers.__version__,
        tokenizers=tokenizers.__version__,
    )
    write_model_card(out, opts, stats)
    return stats


def main(argv=None) -> None:
    """Entry point of ``python -m lmql_backends.models.build_tiny``."""
    stats = build(parse_args(argv))
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
