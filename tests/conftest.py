"""Shared fixtures: tiny randomly initialised models and a tiny byte-level tokenizer, built in seconds."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_configure(config):
    """Tiny models run fastest on one thread; tests on the real model ask for all cores themselves."""
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("HARNESS_DATA_DIR", REPO.parent / "shared" / "data"))

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: How do I boil an egg?\nAnswer: Put it in boiling water for ten minutes.",
    "Sarah was a much better surgeon than Maria so she always got the harder cases.",
    "def add(a, b):\n    return a + b\n",
    "In my palm is a clear stone, and inside it is a small ivory statuette.",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def build_tiny_model(arch: str, vocab_size: int, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512)
        model = GPT2LMHeadModel(config)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny causal LM directory (Llama and GPT-2 variants)."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build_tiny_model(request.param, len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama", len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"evaluation data not found at {DATA_DIR} (set HARNESS_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_dlm_dir(tmp_path_factory) -> Path:
    """A harness-format DLM: a tiny Llama directory plus diffusion_config.json, mask = an added token."""
    import json

    path = tmp_path_factory.mktemp("tiny-dlm")
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"mask_token": "<|mask|>"})
    build_tiny_model("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "diffusion_config.json").write_text(json.dumps(
        {"format": "dlm-harness", "version": 1, "kind": "shifted", "mask_token_id": tokenizer.mask_token_id,
         "base_model": "tiny"}))
    return path


# ---- a tiny bidirectional denoiser for estimator and sampler tests ---------------------------
TINY_VOCAB, TINY_MASK = 16, 15


def tiny_denoiser():
    """Two full-attention encoder layers over a 16-token vocabulary (mask id 15); padding is
    excluded from the attention keys; logits are scaled by 3 so they are sharper than uniform."""
    import torch

    class TinyDenoiser(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(TINY_VOCAB, 32)
            self.position = torch.nn.Embedding(64, 32)
            layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(32, TINY_VOCAB)
            self.eval()

        @torch.no_grad()
        def forward(self, input_ids, attention_mask):
            hidden = self.embed(input_ids) + self.position(torch.arange(input_ids.shape[1]))
            hidden = self.encoder(hidden, src_key_padding_mask=attention_mask == 0)
            return 3 * self.head(hidden)

    return TinyDenoiser()


class Spy:
    """Counts calls and keeps every batch the denoiser received."""

    def __init__(self, denoise) -> None:
        self.denoise, self.batches = denoise, []

    def __call__(self, input_ids, attention_mask):
        self.batches.append((input_ids.clone(), attention_mask.clone()))
        return self.denoise(input_ids, attention_mask)


@pytest.fixture(scope="module")
def tiny_denoiser_model(one_torch_thread):
    """The tiny denoiser, run on one thread: thread hand-offs dominate on a busy small machine."""
    return tiny_denoiser()


# ---- the trainer's tests ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and the test machine is shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """80 lines of three random CORPUS texts each: what the tiny training runs read."""
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(CORPUS).replace("\n", " ") for _ in range(3)) for _ in range(80)))
    return path


@pytest.fixture(scope="module")
def cli():
    """``harness adapt`` through typer's test runner: ``cli(*args)`` -> result."""
    import typer
    from typer.testing import CliRunner

    from harness.train.command import adapt

    app = typer.Typer()
    app.command()(adapt)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])
