"""Training data: read a corpus or prompt/response pairs, tokenise, pack into fixed blocks, order them.

Corpus formats: ``.jsonl`` (one ``{"text"}`` object a line), ``.json`` (a list of ``{"text"}``) or
plain text. Plain text holds one document per blank-line-separated paragraph when it has blank
lines, else one document per line. SFT pairs come from ``.jsonl``/``.json`` records with
``question``/``answer``, ``prompt``/``response`` or ``instruction`` (+ ``input``)/``output``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError

PAIR_KEYS = (("question", "answer"), ("prompt", "response"), ("instruction", "output"))


@dataclass
class TrainData:
    """Fixed-length training sequences; positions before ``loss_start`` are never masked."""

    input_ids: torch.Tensor  # [n, seq_len] int64
    loss_start: torch.Tensor  # [n] int64: 0 for packed text, the prompt length in SFT
    n_sources: int  # documents or pairs that went in
    n_dropped: int = 0  # SFT pairs longer than seq_len, left out

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def read_records(path: Path) -> list[Any]:
    """JSON objects of a .jsonl or .json file."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HarnessError(f"'{path}' is not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise HarnessError(f"'{path}' must hold a JSON list of records")
    return records


def check_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise HarnessError(f"training data '{path}' does not exist or is not a file")
    if path.stat().st_size == 0:
        raise HarnessError(f"training data '{path}' is empty")
    return path


def read_documents(path: str | Path, max_examples: int = 0) -> list[str]:
    """Documents of a corpus file, in file order."""
    path = check_file(path)
    if path.suffix in (".jsonl", ".json"):
        records = read_records(path)
        if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in records):
            raise HarnessError(f"every record of '{path}' needs a string field 'text'")
        docs = [r["text"] for r in records]
    else:
        text = path.read_text(encoding="utf-8")
        docs = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text) else text.splitlines()
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise HarnessError(f"training data '{path}' holds no text")
    return docs[:max_examples] if max_examples else docs


def read_pairs(path: str | Path, max_examples: int = 0) -> list[tuple[str, str]]:
    """(prompt, response) pairs of a .jsonl or .json file."""
    path = check_file(path)
    if path.suffix not in (".jsonl", ".json"):
        raise HarnessError(f"SFT data '{path}' must be .jsonl or .json records")
    pairs = []
    for i, record in enumerate(read_records(path)):
        keys = next((k for k in PAIR_KEYS if isinstance(record, dict) and k[0] in record and k[1] in record),
                    None)
        if keys is None:
            wanted = " / ".join("+".join(k) for k in PAIR_KEYS)
            raise HarnessError(f"record {i} of '{path}' has none of the field pairs {wanted}")
        prompt = str(record[keys[0]])
        if keys[0] == "instruction" and record.get("input"):
            prompt = f"{prompt}\n{record['input']}"
        pairs.append((prompt, str(record[keys[1]])))
    if not pairs:
        raise HarnessError(f"SFT data '{path}' holds no records")
    return pairs[:max_examples] if max_examples else pairs


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise HarnessError("the tokenizer has no EOS token to separate documents")
    return int(tokenizer.eos_token_id)


def pack_documents(docs: list[str], tokenizer, seq_len: int, max_tokens: int = 0) -> TrainData:
    """Concatenate documents with EOS after each and cut the stream into blocks of ``seq_len``."""
    eos = eos_id(tokenizer)
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
        if max_tokens and len(stream) >= max_tokens:
            stream = stream[:max_tokens]
            break
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise HarnessError(f"the corpus holds {len(stream)} tokens, fewer than one block of seq-len {seq_len}")
    blocks = torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    return TrainData(blocks, torch.zeros(n_blocks, dtype=torch.long), n_sources=len(docs))


def build_sft(pairs: list[tuple[str, str]], tokenizer, seq_len: int) -> TrainData:
    """``prompt + "\\n" + response + EOS``, padded with EOS to ``seq_len``.

    The padding belongs to the response (as in LLaDA's SFT): it is masked and learned, so the
    model learns where an answer ends. Pairs that do not fit are left out.
    """
    eos = eos_id(tokenizer)
    prompts = [p if p[-1:].isspace() else p + "\n" for p, _ in pairs]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    rows, starts = [], []
    for p, r in zip(prompt_ids, response_ids):
        ids = p + r + [eos]
        if len(ids) > seq_len or not p:
            continue
        rows.append(ids + [eos] * (seq_len - len(ids)))
        starts.append(len(p))
    if not rows:
        raise HarnessError(f"no prompt/response pair fits in seq-len {seq_len}")
    return TrainData(torch.tensor(rows, dtype=torch.long), torch.tensor(starts, dtype=torch.long),
                     n_sources=len(pairs), n_dropped=len(pairs) - len(rows))


def read_source(path: str, sft: bool, max_examples: int = 0) -> list:
    """Documents, or (prompt, response) pairs with ``sft``; checked before any model is loaded."""
    return read_pairs(path, max_examples) if sft else read_documents(path, max_examples)


def tokenise(source: list, tokenizer, seq_len: int, sft: bool, max_tokens: int = 0) -> TrainData:
    return build_sft(source, tokenizer, seq_len) if sft else pack_documents(source, tokenizer, seq_len, max_tokens)


class DataOrder:
    """Global order of sequences: a fresh permutation per epoch, seeded by (seed, epoch).

    Sequence ``g`` of the run (counting over all processes and steps) is
    ``permutation(g // n)[g % n]``, so the order does not depend on the number of processes.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Dataset indices of global sequences ``start .. start + count - 1``."""
        return torch.stack([self.permutation(g // self.n)[g % self.n] for g in range(start, start + count)])
