"""
seq2seq_project.py -- an LSTM encoder-decoder with additive (Bahdanau) attention that learns to
reverse integer sequences, scored honestly on held-out data and compared with the very same model
without attention.

    python seq2seq_project.py                    # data -> train both models -> evaluate -> results/seq2seq/
    python seq2seq_project.py --report           # rebuild tables and plots from the saved pickles
    python seq2seq_project.py --predict 3 1 7 9  # load the saved model, print "9 7 1 3" and its attention map

Sections, top to bottom (each opens with a "# ---" banner):
  config          CONFIG (every key is also a CLI flag), seeding, device choice, config checks
  data            distinct random integer sequences, disjoint splits, padded batches (SeqDataset)
  model           Encoder ((bi)LSTM), AdditiveAttention (Bahdanau), Decoder (one step), Seq2Seq
  training loop   train_model: one whole training run in one function; its small helpers follow it
  evaluation      greedy decoding scored: exact match, token accuracy, P/R/F1, by length, attention maps
  results         atomic files, pickles, tables, plots, the printed report
  main pipeline   run (data -> both models -> results), load_model, predict
  CLI             one flag per CONFIG key, main

Everything here runs on a laptop CPU in minutes and uses CUDA when it is present.

References
  Sutskever, Vinyals & Le, "Sequence to Sequence Learning with Neural Networks", NeurIPS 2014.
  Bahdanau, Cho & Bengio, "Neural Machine Translation by Jointly Learning to Align and Translate", ICLR 2015.
  Bengio et al., "Scheduled Sampling for Sequence Prediction with RNNs", NeurIPS 2015 (teacher forcing ratio).
"""
import argparse
import copy
import csv
import io
import json
import math
import os
import pickle
import random
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

# -----------------------------------------------------------------------------
# config
# -----------------------------------------------------------------------------
# One dict; every key is also a CLI flag (underscores -> dashes). Units in the comments.
CONFIG = dict(
    # data
    vocab_size=10,            # number of integer symbols 0..vocab_size-1 (10 = the digits)
    min_len=1,                # shortest training/validation/test sequence (tokens)
    max_len=10,               # longest training/validation/test sequence (tokens)
    n_train=10_000,           # training sequences
    n_val=1_000,              # validation sequences (chooses the checkpoint and stops training)
    n_test=1_000,             # test sequences (only reported, never used to choose anything)
    gen_max_len=20,           # length-generalisation test sets cover max_len+1 .. gen_max_len
    n_gen_per_len=100,        # sequences per length in each length-generalisation test set
    # model
    emb_dim=32,               # token embedding size (features)
    hidden_size=128,          # LSTM hidden size per direction in the encoder, and in the decoder (features)
    num_layers=1,             # stacked LSTM layers in the encoder and in the decoder
    bidirectional=True,       # bidirectional encoder (Bahdanau et al. 2015 use one)
    dropout=0.0,              # dropout between stacked LSTM layers (needs num_layers > 1)
    # optimisation
    epochs=30,                # maximum passes over the training set, per model
    batch_size=64,            # sequences per optimiser step
    lr=3e-3,                  # Adam learning rate
    grad_clip=1.0,            # max global L2 norm of the gradients (RNNs occasionally spike)
    teacher_forcing_ratio=1.0,  # probability of feeding the gold previous token at epoch 1 ...
    teacher_forcing_min=0.5,    # ... decayed linearly to this by the last epoch (scheduled sampling)
    patience=5,               # stop after this many epochs without a better validation exact match
    max_train_seconds=300.0,  # wall-clock training budget per model (s); both models get the same one
    seed=0,                   # seeds data, initialisation and batch order
    device="auto",            # "auto" = cuda if available else cpu; or e.g. "cpu", "cuda", "cuda:1", "mps"
    results_dir="results/seq2seq",  # where results.pkl, the weights, summaries and plots go
)

# Special tokens are kept apart from the integers: integer k is token id k + N_SPECIAL.
PAD, SOS, EOS = 0, 1, 2
N_SPECIAL = 3
SPECIAL_NAMES = {PAD: "PAD", SOS: "SOS", EOS: "EOS"}
MODEL_KINDS = ("attention", "baseline")  # baseline = same encoder-decoder, attention context removed


class UserError(Exception):
    """Bad input from the user (bad flag value, missing or corrupt results file): reported without a traceback."""


def set_seed(seed):
    """Seed Python, NumPy and torch (all devices) so a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    """Return a torch.device: CUDA when available for "auto", else CPU.

    Raises UserError, before any work, for a name that is not a device, a device this machine lacks
    (cuda, cuda:N beyond the GPUs present, mps) or a kind this program does not run on.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a device name ({e}): use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but CUDA is not available on this machine: use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} asked for, but MPS (Apple-silicon GPU) is not available on this machine: "
                        "use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: this program runs on cpu, cuda (cuda:N) or mps; use --device auto")
    return device


# The accepted range of every numeric setting, checked before any work (and shown by --help).
# Whole-number settings: key -> the least value accepted.
AT_LEAST = dict(vocab_size=2, min_len=1, n_train=1, n_val=1, n_test=1, n_gen_per_len=1, emb_dim=1, hidden_size=1,
                num_layers=1, epochs=1, batch_size=1, patience=1)
# Sizes, counts and lengths above this could never fit in memory (NumPy cannot even draw lengths past 2**63).
MAX_SIZE = 10**9
SIZE_KEYS = ("vocab_size", "min_len", "max_len", "gen_max_len", "n_train", "n_val", "n_test", "n_gen_per_len",
             "emb_dim", "hidden_size", "num_layers")
MAX_SEED = 2**32 - 1  # NumPy's global seed (np.random.seed) takes 0 .. 2**32 - 1
MAX_LR = 1e37  # Adam's first step is 10 x lr, which must fit in a 32-bit float (at most 3.4e38)
# The other numeric settings: key -> (is a value accepted?, the accepted range in words). NaN fails every test.
RANGES = dict(
    {key: (lambda v, least=least: v >= least, f"an integer >= {least}") for key, least in AT_LEAST.items()},
    max_len=(lambda v: v >= 1, "an integer >= min_len"),
    gen_max_len=(lambda v: v >= 1, "an integer >= max_len (equal: no length-generalisation sets)"),
    dropout=(lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    lr=(lambda v: 0.0 < v <= MAX_LR, "a number in (0, 1e37]"),
    grad_clip=(lambda v: 0.0 < v < math.inf, "a finite number > 0"),
    teacher_forcing_ratio=(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    teacher_forcing_min=(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    max_train_seconds=(lambda v: 0.0 < v < math.inf, "a finite number > 0"),
    seed=(lambda v: 0 <= v <= MAX_SEED, f"an integer in 0..{MAX_SEED}"),
)


def flag(key):
    """The command-line flag of a CONFIG key: "n_train" -> "--n-train"."""
    return "--" + key.replace("_", "-")


def validate_config(cfg):
    """Raise UserError, with one line naming the flag(s) and what to change, when a setting is outside its
    range (RANGES), contradicts another one, or asks for more distinct sequences than exist. Run before any work."""
    for key, (accepted, words) in RANGES.items():
        if not accepted(cfg[key]):
            raise UserError(f"{flag(key)} {cfg[key]} is out of range: use {words}")
    for key in SIZE_KEYS:
        if cfg[key] > MAX_SIZE:
            raise UserError(f"{flag(key)} {cfg[key]} is too large: sizes, counts and lengths above {MAX_SIZE:,} "
                            "cannot fit in memory")
    if cfg["min_len"] > cfg["max_len"]:
        raise UserError(f"--min-len ({cfg['min_len']}) must not exceed --max-len ({cfg['max_len']})")
    if cfg["gen_max_len"] < cfg["max_len"]:
        raise UserError(f"--gen-max-len ({cfg['gen_max_len']}) must not be below --max-len ({cfg['max_len']}): the "
                        "length-generalisation sets cover max_len+1..gen_max_len (equal to --max-len: none)")
    if cfg["dropout"] > 0 and cfg["num_layers"] == 1:
        raise UserError(f"--dropout {cfg['dropout']} has no effect with --num-layers 1 (dropout acts between stacked "
                        "LSTM layers): use --num-layers 2 or more, or leave --dropout at 0")
    if cfg["teacher_forcing_min"] > cfg["teacher_forcing_ratio"]:
        raise UserError(f"--teacher-forcing-min ({cfg['teacher_forcing_min']}) must not exceed --teacher-forcing-ratio "
                        f"({cfg['teacher_forcing_ratio']}): the ratio falls from the one to the other over the epochs")
    check_drawable(cfg)


def distinct_sequences(vocab_size, min_len, max_len, cap):
    """How many distinct integer sequences of lengths min_len..max_len exist over vocab_size >= 2 symbols,
    counted exactly up to `cap` (any larger count is returned as cap + 1, so huge lengths cost nothing)."""
    total = 0
    for n in range(min_len, max_len + 1):
        total += vocab_size ** min(n, cap.bit_length())  # vocab_size**bit_length > cap already
        if total > cap:
            return cap + 1
    return total


def check_drawable(cfg):
    """Raise UserError when the splits ask for more distinct sequences than exist (drawing them would never end)."""
    V, lo, hi = cfg["vocab_size"], cfg["min_len"], cfg["max_len"]
    needed = cfg["n_train"] + cfg["n_val"] + cfg["n_test"]
    available = distinct_sequences(V, lo, hi, needed)
    if needed > available:
        raise UserError(f"only {available} distinct sequences exist for vocab {V} and lengths {lo}..{hi}, but the "
                        f"splits need {needed} distinct ones: lower --n-train/--n-val/--n-test, or raise "
                        "--vocab-size or --max-len")
    n_gen, shortest = cfg["n_gen_per_len"], hi + 1  # the shortest generalisation length has the fewest
    if cfg["gen_max_len"] > hi and distinct_sequences(V, shortest, shortest, n_gen) < n_gen:
        raise UserError(f"--n-gen-per-len {n_gen} is more than the {V ** shortest} distinct sequences of length "
                        f"{shortest} (vocab {V}): lower --n-gen-per-len to at most {V ** shortest}, or raise "
                        "--vocab-size or --max-len")


def check_results_dir(path):
    """Create the results folder and write (then drop) a temporary file in it, so that a folder that cannot hold
    results is found before any training. Raises UserError naming --results-dir otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--results-dir {path} is a file, not a folder: choose a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"--results-dir {path}: cannot write there ({e.strerror or e}): choose another folder") from None


# -----------------------------------------------------------------------------
# data
# -----------------------------------------------------------------------------
def encode(seq):
    """Integer sequence -> token ids (integer k becomes k + N_SPECIAL)."""
    return [int(k) + N_SPECIAL for k in seq]


def decode(ids):
    """Token ids -> integer sequence, stopping at the first EOS and dropping PAD/SOS."""
    out = []
    for i in ids:
        i = int(i)
        if i == EOS:
            break
        if i >= N_SPECIAL:
            out.append(i - N_SPECIAL)
    return out


def sample_unique_sequences(rng, n, vocab_size, min_len, max_len, exclude=frozenset()):
    """Draw n distinct integer sequences, lengths uniform in [min_len, max_len], none of them in `exclude`.

    A draw that repeats an earlier one is rejected, so lengths with few possible sequences (length 1 has
    only vocab_size) end up under-represented rather than duplicated. Returns a list of tuples of ints.
    """
    seen, out = set(exclude), []
    while len(out) < n:
        length = int(rng.integers(min_len, max_len + 1))
        seq = tuple(int(x) for x in rng.integers(0, vocab_size, size=length))
        if seq not in seen:
            seen.add(seq)
            out.append(seq)
    return out


def make_splits(cfg):
    """Seeded train/val/test splits plus length-generalisation sets; all splits are disjoint.

    Returns a dict name -> list of integer tuples: "train", "val", "test" (lengths min_len..max_len) and
    "gen" (lengths max_len+1..gen_max_len, n_gen_per_len of each). The target of a sequence is its reverse.
    """
    rng = np.random.default_rng(cfg["seed"])
    n_main = cfg["n_train"] + cfg["n_val"] + cfg["n_test"]
    pool = sample_unique_sequences(rng, n_main, cfg["vocab_size"], cfg["min_len"], cfg["max_len"])
    order = rng.permutation(n_main)  # shuffle so that rejection order does not bias one split
    pool = [pool[i] for i in order]
    splits = dict(test=pool[:cfg["n_test"]],
                  val=pool[cfg["n_test"]:cfg["n_test"] + cfg["n_val"]],
                  train=pool[cfg["n_test"] + cfg["n_val"]:])
    gen = []
    for length in range(cfg["max_len"] + 1, cfg["gen_max_len"] + 1):
        gen += sample_unique_sequences(rng, cfg["n_gen_per_len"], cfg["vocab_size"], length, length)
    splits["gen"] = gen
    return splits


class SeqDataset:
    """Padded source/target tensors for a list of integer sequences, held on `device`.

    src: (N, S) token ids, PAD after each sequence; tgt: (N, S+1) reversed sequence then EOS, then PAD;
    lengths: (N,) source lengths on the CPU (pack_padded_sequence wants them there).
    """

    def __init__(self, seqs, device):
        self.seqs = list(seqs)
        n, S = len(self.seqs), max(len(s) for s in self.seqs)
        src = torch.full((n, S), PAD, dtype=torch.long)
        tgt = torch.full((n, S + 1), PAD, dtype=torch.long)
        for i, s in enumerate(self.seqs):
            ids = encode(s)
            src[i, :len(ids)] = torch.tensor(ids)
            tgt[i, :len(ids) + 1] = torch.tensor(ids[::-1] + [EOS])
        self.lengths = torch.tensor([len(s) for s in self.seqs], dtype=torch.long)
        self.src, self.tgt = src.to(device), tgt.to(device)

    def __len__(self):
        return len(self.seqs)

    def batches(self, batch_size, generator=None):
        """Yield (src, lengths, tgt) batches, each padded only to its own longest sequence.

        Shuffled when a torch.Generator is given, in order otherwise.
        """
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            lengths = self.lengths[idx]
            S = int(lengths.max())  # CPU tensor: no device sync
            idx_dev = idx.to(self.src.device)
            yield self.src[idx_dev, :S], lengths, self.tgt[idx_dev, :S + 1]


# -----------------------------------------------------------------------------
# model
# -----------------------------------------------------------------------------
class Encoder(nn.Module):
    """Embedding + (bi)LSTM reading the source; returns every hidden state (Sutskever et al. 2014).

    forward(src (B, S) long, lengths (B,) long CPU) ->
      outputs (B, S, D) with D = hidden_size * (2 if bidirectional else 1), zeros at padded positions;
      (h, c) each (num_layers, B, D): the final states, forward and backward directions concatenated.
    Packing keeps the backward direction from reading the padding.
    """

    def __init__(self, n_tokens, emb_dim, hidden_size, num_layers, bidirectional, dropout):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, emb_dim, padding_idx=PAD)
        self.rnn = nn.LSTM(emb_dim, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional,
                           dropout=dropout if num_layers > 1 else 0.0)
        self.num_layers, self.num_dirs = num_layers, 2 if bidirectional else 1
        self.out_dim = hidden_size * self.num_dirs

    def forward(self, src, lengths):
        B, S = src.shape  # src: (B, S) token ids
        emb = self.embedding(src)  # (B, S, E)
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)  # real tokens only
        outputs, (h, c) = self.rnn(packed)  # h, c: (layers*dirs, B, H)
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=S)  # (B, S, D), zeros at padding

        def merge(x):  # (layers*dirs, B, H) -> (layers, B, dirs*H)
            return x.view(self.num_layers, self.num_dirs, B, -1).permute(0, 2, 1, 3).reshape(self.num_layers, B, -1)

        return outputs, (merge(h), merge(c))  # (B, S, D); h, c: (layers, B, D)


class AdditiveAttention(nn.Module):
    """Additive attention (Bahdanau, Cho & Bengio, "Neural Machine Translation by Jointly Learning to Align and
    Translate", ICLR 2015): score_j = v^T tanh(W_s s + W_h h_j), s the decoder state, h_j the encoder output j.

    forward(query (B, Q), keys (B, S, D), projected_keys (B, S, A) = project(keys), mask (B, S) bool,
    True at real source positions) -> context (B, D), weights (B, S).
    Weights are a softmax over source positions with padding set to -inf first, so each row sums to 1 and
    padded positions get exactly 0. Every row needs at least one real position.
    """

    def __init__(self, query_dim, key_dim, attn_dim):
        super().__init__()
        self.W_s = nn.Linear(query_dim, attn_dim, bias=False)
        self.W_h = nn.Linear(key_dim, attn_dim, bias=True)
        self.v = nn.Linear(attn_dim, 1, bias=False)

    def project(self, keys):
        """W_h h_j for every source position, computed once per sequence: (B, S, D) -> (B, S, A)."""
        return self.W_h(keys)

    def forward(self, query, keys, projected_keys, mask):
        query_part = self.W_s(query).unsqueeze(1)  # (B, 1, A): broadcast over the S source positions
        scores = self.v(torch.tanh(projected_keys + query_part)).squeeze(-1)  # (B, S, A) -> (B, S)
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)  # (B, S), rows sum to 1
        context = torch.bmm(weights.unsqueeze(1), keys).squeeze(1)  # (B, 1, S) @ (B, S, D) -> (B, D)
        return context, weights


class Decoder(nn.Module):
    """One decoding step: embedding of the previous token (+ attention context) -> LSTM -> linear over vocab.

    step(prev (B,) long, state (h, c) each (num_layers, B, H), enc_out (B, S, D), proj_keys (B, S, A) or None,
    mask (B, S) bool) -> logits (B, V), new state, attention weights (B, S) or None.
    With use_attention=False this is the plain Sutskever et al. (2014) decoder: the context is removed.
    """

    def __init__(self, n_tokens, emb_dim, hidden_size, enc_dim, num_layers, use_attention, dropout):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, emb_dim, padding_idx=PAD)
        self.attention = AdditiveAttention(hidden_size, enc_dim, hidden_size) if use_attention else None
        in_dim = emb_dim + (enc_dim if use_attention else 0)
        self.rnn = nn.LSTM(in_dim, hidden_size, num_layers, batch_first=True,
                           dropout=dropout if num_layers > 1 else 0.0)
        self.out = nn.Linear(hidden_size, n_tokens)

    def step(self, prev, state, enc_out, proj_keys, mask):
        x = self.embedding(prev)  # (B, E)
        weights = None
        if self.attention is not None:
            # the query is the previous top-layer decoder state s_{t-1}, as in Bahdanau et al.
            context, weights = self.attention(state[0][-1], enc_out, proj_keys, mask)  # (B, D), (B, S)
            x = torch.cat([x, context], dim=-1)  # (B, E + D)
        out, state = self.rnn(x.unsqueeze(1), state)  # out: (B, 1, H); h, c: (num_layers, B, H)
        return self.out(out.squeeze(1)), state, weights  # logits (B, V)


class Seq2Seq(nn.Module):
    """LSTM encoder-decoder, with or without additive attention: Sutskever, Vinyals & Le, "Sequence to Sequence
    Learning with Neural Networks" (NeurIPS 2014); Bahdanau, Cho & Bengio, "Neural Machine Translation by Jointly
    Learning to Align and Translate" (ICLR 2015).

    forward(src (B, S), lengths (B,) CPU, tgt (B, T) or None, teacher_forcing_ratio, max_steps) ->
      logits (B, T', V) and attention (B, T', S) (None for the baseline).
    Decoding always starts from SOS. With tgt given, T' = T and each step's input is the gold previous
    token with probability teacher_forcing_ratio, else the model's own argmax (per sequence, per step).
    With tgt=None it is free-running greedy decoding for max_steps steps that stops early once every
    sequence has produced EOS (tokens after a sequence's EOS are ignored by the metrics).
    """

    def __init__(self, n_tokens, emb_dim, hidden_size, num_layers, bidirectional, use_attention, dropout=0.0):
        super().__init__()
        self.encoder = Encoder(n_tokens, emb_dim, hidden_size, num_layers, bidirectional, dropout)
        D = self.encoder.out_dim
        # bridge: the encoder's final (bi)directional state initialises the decoder (Bahdanau: s_0 = tanh(W h))
        self.bridge_h = nn.Linear(D, hidden_size)
        self.bridge_c = nn.Linear(D, hidden_size)
        self.decoder = Decoder(n_tokens, emb_dim, hidden_size, D, num_layers, use_attention, dropout)
        self.use_attention = use_attention

    def forward(self, src, lengths, tgt=None, teacher_forcing_ratio=0.0, max_steps=None):
        B, S = src.shape
        enc_out, (h, c) = self.encoder(src, lengths)  # (B, S, D); h, c: (num_layers, B, D)
        state = (torch.tanh(self.bridge_h(h)).contiguous(), self.bridge_c(c).contiguous())  # each (num_layers, B, H)
        mask = src != PAD  # (B, S)
        proj = self.decoder.attention.project(enc_out) if self.use_attention else None  # (B, S, A)
        steps = tgt.size(1) if tgt is not None else (max_steps or S + 2)
        prev = torch.full((B,), SOS, dtype=torch.long, device=src.device)
        finished = torch.zeros(B, dtype=torch.bool, device=src.device)
        all_logits, all_weights = [], []
        for t in range(steps):
            logits, state, weights = self.decoder.step(prev, state, enc_out, proj, mask)  # (B, V), weights (B, S)
            all_logits.append(logits)
            if weights is not None:
                all_weights.append(weights)
            pred = logits.argmax(-1)
            if tgt is None:
                finished |= pred == EOS
                if bool(finished.all()):  # eval only: one sync per step to stop early
                    break
                prev = pred
            elif teacher_forcing_ratio >= 1.0:
                prev = tgt[:, t]
            elif teacher_forcing_ratio <= 0.0:
                prev = pred
            else:
                use_gold = torch.rand(B, device=src.device) < teacher_forcing_ratio
                prev = torch.where(use_gold, tgt[:, t], pred)  # (B,)
        logits = torch.stack(all_logits, dim=1)  # (B, T', V)
        attention = torch.stack(all_weights, dim=1) if all_weights else None  # (B, T', S)
        return logits, attention


def build_model(cfg, use_attention):
    """A Seq2Seq sized from the config; token ids cover the integers plus PAD, SOS, EOS."""
    return Seq2Seq(cfg["vocab_size"] + N_SPECIAL, cfg["emb_dim"], cfg["hidden_size"], cfg["num_layers"],
                   cfg["bidirectional"], use_attention, cfg["dropout"])


# -----------------------------------------------------------------------------
# training loop
# -----------------------------------------------------------------------------
def train_model(cfg, kind, data, device, log=print):
    """Train one model ("attention" or "baseline") with Adam, gradient clipping and scheduled teacher forcing.

    After each epoch both the validation set and a fixed training subset (as large as the validation set) are
    scored with free-running greedy decoding. The checkpoint with the best validation exact match (ties: lower
    validation loss) is kept; training stops after `patience` epochs without improvement, when validation
    exact match reaches 1.0, at `epochs`, or when one more epoch would pass max_train_seconds of wall time.
    A run whose loss became NaN or infinite stops after that epoch, with info status "failed" and the reason.
    The test set is not touched.
    Returns (model with the chosen weights, history dict of per-epoch lists, info dict).
    """
    set_seed(cfg["seed"])  # same initialisation stream and batch order for both models
    model = build_model(cfg, use_attention=(kind == "attention")).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    # halve the learning rate when validation exact match stalls: late epochs refine instead of oscillating
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=1)
    gen = torch.Generator().manual_seed(cfg["seed"])  # shuffles the training set anew each epoch
    train_probe = SeqDataset(data["train"].seqs[:len(data["val"])], device)  # scored like val: shows over-fitting
    hist = {key: [] for key in HISTORY_KEYS}
    best, best_state, best_epoch, since_best = None, None, -1, 0
    t0, stop_reason, failure = time.perf_counter(), None, None
    for epoch in range(cfg["epochs"]):
        model.train()
        tf = teacher_forcing_at(cfg, epoch)  # probability of feeding the gold previous token this epoch
        loss_sum, n_tok = torch.zeros((), device=device), 0  # summed on the device: no per-step .item() sync
        for src, lengths, tgt in epoch_batches(data["train"], cfg, gen, f"{kind} epoch {epoch + 1}/{cfg['epochs']}"):
            logits, _ = model(src, lengths, tgt=tgt, teacher_forcing_ratio=tf)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=PAD)  # nats per target token
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            opt.step()
            k = int((lengths + 1).sum())  # target tokens in the batch, EOS included (CPU lengths: no sync)
            loss_sum += loss.detach() * k
            n_tok += k
        # validation: free-running greedy decoding on the validation set and on the training subset
        tr, va = evaluate(model, train_probe), evaluate(model, data["val"])
        elapsed = time.perf_counter() - t0
        record_epoch(hist, epoch, tf, float(loss_sum) / n_tok, tr, va, opt.param_groups[0]["lr"], elapsed)
        sched.step(va["exact_match"])
        improved = best is None or (va["exact_match"], -va["loss"]) > best
        if improved:  # keep a copy of the best weights so far: training goes on changing the model
            best, best_epoch, since_best = (va["exact_match"], -va["loss"]), epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
        log_epoch(log, kind, hist, improved)
        failure = divergence(hist)  # a NaN or infinite loss: nothing more to learn, the run has failed
        stop_reason = failure or reason_to_stop(cfg, hist, since_best)
        if stop_reason:
            break
    model.load_state_dict(best_state)
    info = dict(train_seconds=time.perf_counter() - t0, best_epoch=best_epoch, epochs_run=len(hist["epoch"]),
                stop_reason=stop_reason or "epochs", n_params=sum(p.numel() for p in model.parameters()),
                status="failed" if failure else "ok", failure_reason=failure)
    return model, hist, info


# the training loop's machinery: schedule, progress bar, history, log line, stopping rules
def teacher_forcing_at(cfg, epoch):
    """Teacher forcing ratio for a 0-based epoch: linear from teacher_forcing_ratio to teacher_forcing_min."""
    if cfg["epochs"] <= 1:
        return cfg["teacher_forcing_ratio"]
    frac = epoch / (cfg["epochs"] - 1)
    return cfg["teacher_forcing_ratio"] + frac * (cfg["teacher_forcing_min"] - cfg["teacher_forcing_ratio"])


def epoch_batches(train, cfg, gen, desc):
    """One epoch of shuffled (src, lengths, tgt) training batches behind a progress bar (shown on a terminal only)."""
    from tqdm.auto import tqdm

    n_batches = math.ceil(len(train) / cfg["batch_size"])
    with tqdm(train.batches(cfg["batch_size"], gen), total=n_batches, leave=False, desc=desc,
              disable=None, mininterval=1.0) as bar:
        yield from bar


# per-epoch history: train_loss_running is the mean teacher-forced training loss over the epoch's batches;
# train_* / val_* are the training subset and the validation set scored after the epoch
HISTORY_KEYS = ("epoch", "teacher_forcing_ratio", "train_loss_running", "train_loss", "train_token_acc",
                "train_exact_match", "val_loss", "val_token_acc", "val_exact_match", "lr", "elapsed_s")


def record_epoch(hist, epoch, tf, running_loss, tr, va, lr, elapsed):
    """Append one epoch's numbers to the history lists (keys: HISTORY_KEYS)."""
    values = (epoch + 1, tf, running_loss, tr["loss"], tr["token_acc"], tr["exact_match"], va["loss"],
              va["token_acc"], va["exact_match"], lr, elapsed)
    for key, val in zip(HISTORY_KEYS, values):  # one value per key, in HISTORY_KEYS order
        hist[key].append(val)


def log_epoch(log, kind, hist, improved):
    """One log line for the latest epoch in `hist`; a * marks a new best validation score."""
    h = {key: values[-1] for key, values in hist.items()}
    log(f"[{kind}] epoch {h['epoch']:2d}  tf {h['teacher_forcing_ratio']:.2f}  "
        f"train loss {h['train_loss_running']:.4f}  val loss {h['val_loss']:.4f}  "
        f"val tok acc {h['val_token_acc']:.4f}  val exact {h['val_exact_match']:.4f}"
        f"{'  *' if improved else ''}  ({h['elapsed_s']:.0f}s)")


def divergence(hist):
    """Why the run has failed after the latest epoch in `hist` (its training or validation loss became NaN or
    infinite), or None."""
    for key, name in (("train_loss_running", "training loss"), ("val_loss", "validation loss")):
        if not math.isfinite(hist[key][-1]):
            return f"{name} became {hist[key][-1]} in epoch {hist['epoch'][-1]}"
    return None


def reason_to_stop(cfg, hist, since_best):
    """Why training should stop after the latest epoch in `hist`, or None to go on."""
    if hist["val_exact_match"][-1] >= 1.0:
        return "validation exact match reached 1.0"
    if since_best >= cfg["patience"]:
        return f"no validation improvement in {cfg['patience']} epochs"
    elapsed = hist["elapsed_s"][-1]
    epoch_s = elapsed - (hist["elapsed_s"][-2] if len(hist["elapsed_s"]) > 1 else 0.0)
    if elapsed + epoch_s > cfg["max_train_seconds"]:  # another epoch would overrun the budget
        return f"training budget of {cfg['max_train_seconds']:.0f}s reached"
    return None


# -----------------------------------------------------------------------------
# evaluation
# -----------------------------------------------------------------------------
def clean_predictions(pred):
    """Greedy outputs (B, T') -> same shape with every token after a sequence's first EOS set to PAD."""
    is_eos = pred == EOS
    after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return pred.masked_fill(after_eos, PAD)


@torch.no_grad()
def evaluate(model, data, batch_size=512, keep_predictions=False):
    """Score a model on a SeqDataset: free-running greedy decoding for the accuracies, teacher-forced loss.

    Returns dict with loss (mean cross-entropy per non-pad target token, nats, teacher forced), token_acc
    (fraction of non-pad target positions, EOS included, predicted right), exact_match (fraction of sequences
    whose whole output up to and including EOS is right), precision / recall / f1 (scikit-learn macro averages
    over the integer tokens and EOS at target positions), n (sequences); with keep_predictions also
    per-sequence arrays y_true/y_pred (flattened tokens) and seq_correct (bool, per sequence).
    """
    from sklearn.metrics import precision_recall_fscore_support

    model.eval()
    loss_sum = torch.zeros((), device=data.src.device)
    n_tok = 0
    y_true, y_pred, seq_correct, tok_correct, tok_count = [], [], [], [], []
    for src, lengths, tgt in data.batches(batch_size):
        logits, _ = model(src, lengths, tgt=tgt, teacher_forcing_ratio=1.0)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=PAD, reduction="sum")
        n_tok += int((lengths + 1).sum())
        gen_logits, _ = model(src, lengths, max_steps=src.size(1) + 2)
        pred = clean_predictions(gen_logits.argmax(-1))
        T = tgt.size(1)
        if pred.size(1) < T:  # stopped early (everyone emitted EOS): pad to the target length
            pred = F.pad(pred, (0, T - pred.size(1)), value=PAD)
        # a sequence is right when every target position matches and nothing but PAD follows the EOS
        extra = (pred[:, T:] != PAD).any(dim=1) if pred.size(1) > T else torch.zeros_like(lengths, dtype=torch.bool, device=pred.device)
        pred = pred[:, :T]
        valid = tgt != PAD
        match = (pred == tgt) & valid
        seq_correct.append(((match.sum(1) == valid.sum(1)) & ~extra).cpu())
        tok_correct.append(match.sum(1).cpu())
        tok_count.append(valid.sum(1).cpu())
        y_true.append(tgt[valid].cpu())
        y_pred.append(pred[valid].cpu())
    seq_correct = torch.cat(seq_correct).numpy()
    tok_correct, tok_count = torch.cat(tok_correct).numpy(), torch.cat(tok_count).numpy()
    y_true, y_pred = torch.cat(y_true).numpy(), torch.cat(y_pred).numpy()
    # classes = output tokens (integers and EOS) that occur in the targets or the predictions; a PAD/SOS
    # prediction (output ended early) is simply wrong for the true class, not a class of its own
    labels = sorted(int(x) for x in np.union1d(y_true, y_pred) if x == EOS or x >= N_SPECIAL)
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    out = dict(loss=float(loss_sum) / max(n_tok, 1), token_acc=float(tok_correct.sum() / max(tok_count.sum(), 1)),
               exact_match=float(seq_correct.mean()), precision=float(p), recall=float(r), f1=float(f),
               n=int(len(data)))
    if keep_predictions:
        out.update(seq_correct=seq_correct, tok_correct=tok_correct, tok_count=tok_count)
    return out


def accuracy_by_length(model, datasets, batch_size=512):
    """Per source length, exact match and token accuracy over the given SeqDatasets.

    Returns dict with NumPy arrays: length, n, exact_match, token_acc (one entry per length present).
    """
    by_len = {}
    for data in datasets:
        res = evaluate(model, data, batch_size, keep_predictions=True)
        for L, ok, tc, tn in zip(data.lengths.tolist(), res["seq_correct"], res["tok_correct"], res["tok_count"]):
            d = by_len.setdefault(L, [0, 0, 0, 0])
            d[0] += 1; d[1] += int(ok); d[2] += int(tc); d[3] += int(tn)
    lengths = sorted(by_len)
    return dict(length=np.array(lengths), n=np.array([by_len[L][0] for L in lengths]),
                exact_match=np.array([by_len[L][1] / by_len[L][0] for L in lengths]),
                token_acc=np.array([by_len[L][2] / by_len[L][3] for L in lengths]))


@torch.no_grad()
def attention_examples(model, seqs, device):
    """Greedy-decode a few integer sequences and return their attention maps.

    Returns a list of dicts: source (list of ints), prediction (list of ints), weights (NumPy (T_out, S)
    array: row t = attention over the source positions while emitting output token t, EOS row included),
    output (T_out labels of those rows: the integers, or EOS / PAD / SOS where the model emitted one).
    Empty list for the no-attention baseline.
    """
    if not model.use_attention:
        return []
    model.eval()
    out = []
    for seq in seqs:
        src = torch.tensor([encode(seq)], device=device)
        logits, attn = model(src, torch.tensor([len(seq)]), max_steps=len(seq) + 2)
        ids = logits.argmax(-1)[0].tolist()
        n_out = ids.index(EOS) + 1 if EOS in ids else len(ids)
        out.append(dict(source=list(seq), prediction=decode(ids),
                        weights=attn[0, :n_out].cpu().numpy().astype(np.float32),
                        output=[SPECIAL_NAMES.get(i, str(i - N_SPECIAL)) for i in ids[:n_out]]))
    return out


# -----------------------------------------------------------------------------
# results: atomic files, pickles, plots, tables
# -----------------------------------------------------------------------------
def atomic_write_bytes(path, data):
    """Write bytes to `path` via a temp file in the same folder + os.replace, so a killed run never leaves half a file.

    Raises UserError (one line naming the file) when the disk is full, read-only or not writable."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are meant to be shared
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def write_error(path, err):
    """The UserError for a file that could not be written (disk full, read-only, no permission)."""
    return UserError(f"could not write {path} ({err.strerror or err}): make room on the disk or write elsewhere")


def remove_file(path):
    """Delete `path` if it exists; UserError (write_error) when it cannot be deleted."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise write_error(path, e) from None


def save_pickle(path, obj):
    """Pickle `obj` (plain Python types and NumPy arrays only) to `path` atomically."""
    atomic_write_bytes(path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def load_results(results_dir):
    """Load results.pkl from results_dir; raises UserError naming the file when it is missing or corrupt."""
    path = os.path.join(results_dir, "results.pkl")
    if not os.path.exists(path):
        raise UserError(f"{path} not found: run `python seq2seq_project.py --results-dir {results_dir}` first")
    try:
        with open(path, "rb") as f:
            res = pickle.load(f)
        if not isinstance(res, dict) or "config" not in res or "models" not in res:
            raise ValueError("not a seq2seq results dict")
    except Exception as e:
        raise UserError(f"{path} is corrupt or not a results file ({type(e).__name__}: {e})") from None
    return res


def save_weights(path, model):
    """torch.save(state_dict) atomically; load with torch.load(..., weights_only=True)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(path, buf.getvalue())


def save_figure(fig, path):
    """Save a matplotlib figure as PNG to `path` atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


METRIC_KEYS = ("exact_match", "token_acc", "precision", "recall", "f1", "loss")
MODEL_COLORS = {"attention": "tab:blue", "baseline": "tab:orange"}
PLOT_NAMES = ("loss_curves.png", "accuracy_curves.png", "accuracy_vs_length.png", "attention_heatmaps.png")


def model_failed(m):
    """Whether a model's record (res["models"][kind]) is of a failed run: its loss became NaN or infinite.
    Such a record has its history and info (status, failure_reason) but no test scores (test is None)."""
    return m["info"].get("status") == "failed"


def comparison_table(res):
    """Markdown table of test metrics, training time and epochs for every model in a results dict."""
    head = "| model | exact match | token acc | precision | recall | F1 | loss (nats) | train time (s) | epochs (best) | params |"
    rows = [head, "|" + "---|" * 10]
    for kind, m in res["models"].items():
        t, i = m["test"], m["info"]
        if model_failed(m):
            rows.append(f"| {kind} | failed: {i['failure_reason']} | | | | | | {i['train_seconds']:.1f} | "
                        f"{i['epochs_run']} (-) | {i['n_params']:,} |")
            continue
        rows.append(f"| {kind} | {t['exact_match']:.4f} | {t['token_acc']:.4f} | {t['precision']:.4f} | "
                    f"{t['recall']:.4f} | {t['f1']:.4f} | {t['loss']:.4f} | {i['train_seconds']:.1f} | "
                    f"{i['epochs_run']} ({i['best_epoch']}) | {i['n_params']:,} |")
    return "\n".join(rows)


def length_table(res):
    """Markdown table of exact match per source length for every model (lengths beyond max_len are unseen)."""
    kinds = list(res["models"])
    scored = [k for k in kinds if not model_failed(res["models"][k])]
    if not scored:
        return ""
    lengths = res["models"][scored[0]]["by_length"]["length"]
    rows = ["| length | n | " + " | ".join(f"{k} exact match" for k in kinds) + " |", "|" + "---|" * (2 + len(kinds))]
    for j, L in enumerate(lengths):
        n = res["models"][scored[0]]["by_length"]["n"][j]
        rows.append(f"| {int(L)} | {int(n)} | " + " | ".join(f"{res['models'][k]['by_length']['exact_match'][j]:.3f}"
                                                          if k in scored else "failed" for k in kinds) + " |")
    return "\n".join(rows)


def write_summary(res, results_dir):
    """summary.json (config + test metrics + info per model) and summary.csv (one row per model), atomically."""
    summary = dict(config=res["config"], device=res.get("device"), hardware=res.get("hardware"),
                   models={k: dict(test=m["test"], info=m["info"]) for k, m in res["models"].items()})
    atomic_write_bytes(os.path.join(results_dir, "summary.json"), json.dumps(summary, indent=2).encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", *METRIC_KEYS, "train_seconds", "epochs_run", "best_epoch", "n_params", "status"])
    for k, m in res["models"].items():
        metrics = [""] * len(METRIC_KEYS) if model_failed(m) else [f"{m['test'][key]:.6f}" for key in METRIC_KEYS]
        w.writerow([k, *metrics, f"{m['info']['train_seconds']:.1f}", m["info"]["epochs_run"],
                    m["info"]["best_epoch"], m["info"]["n_params"], m["info"].get("status", "ok")])
    atomic_write_bytes(os.path.join(results_dir, "summary.csv"), buf.getvalue().encode())


def make_plots(res, results_dir):
    """Loss curves, accuracy curves, accuracy vs length and attention heatmaps as PNGs in results_dir.

    A failed model (its loss became NaN or infinite) is drawn dotted up to its last finite value and marked
    "failed"; it has no accuracy-vs-length line and no heatmaps. A plot of PLOT_NAMES that this run has nothing
    for is removed. Returns the names of the files written.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not res["models"]:
        return []
    written = plot_curves(plt, res, results_dir)
    if any(not model_failed(m) for m in res["models"].values()):
        plot_accuracy_vs_length(plt, res, results_dir)
        written.append("accuracy_vs_length.png")
    examples = res["models"].get("attention", {}).get("attention_examples", [])
    if examples:
        fig, axes = plt.subplots(1, len(examples), figsize=(4.0 * len(examples) + 1.0, 4.0), squeeze=False)
        fig.subplots_adjust(wspace=0.35)
        for ax, ex in zip(axes[0], examples):
            im = draw_heatmap(ax, ex, res["config"]["max_len"])
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="attention weight")
        fig.suptitle("additive attention on held-out sequences (rows: outputs, columns: source)")
        save_figure(fig, os.path.join(results_dir, "attention_heatmaps.png")); plt.close(fig)
        written.append("attention_heatmaps.png")
    for name in PLOT_NAMES:  # an earlier run's plot that this one has nothing for would mislead: drop it
        if name not in written:
            remove_file(os.path.join(results_dir, name))
    return written


def plot_curves(plt, res, results_dir):
    """loss_curves.png and accuracy_curves.png: training and validation per epoch for every model. NaN and
    infinite values are left out of the lines (a gap); the loss axis is logarithmic when it has positive values.
    Returns the two file names."""
    from matplotlib.ticker import MaxNLocator

    written = []
    for name, keys, ylabel in (("loss_curves.png", ("train_loss", "val_loss"), "cross-entropy (nats/token, teacher forced)"),
                               ("accuracy_curves.png", ("train_exact_match", "val_exact_match"), "sequence exact match (greedy)")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        drawn = []
        for kind, m in res["models"].items():
            h, failed = m["history"], model_failed(m)
            for key, style in zip(keys, ("--", "-")):
                values = np.asarray(h[key], dtype=float)
                values[~np.isfinite(values)] = np.nan  # matplotlib draws NaN as a gap
                drawn.append(values)
                ax.plot(h["epoch"], values, ":" if failed else style, color=MODEL_COLORS.get(kind), marker="o",
                        ms=3, label=f"{kind} {key.split('_')[0]}{' (failed)' if failed else ''}")
        ax.set_xlabel("epoch"); ax.set_ylabel(ylabel); ax.grid(alpha=0.3); ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if "loss" in name and any((v > 0).any() for v in drawn):
            ax.set_yscale("log")
        ax.set_title(f"reversal, lengths {res['config']['min_len']}..{res['config']['max_len']}: "
                     f"{'loss' if 'loss' in name else 'accuracy'} per epoch")
        save_figure(fig, os.path.join(results_dir, name)); plt.close(fig); written.append(name)
    return written


def plot_accuracy_vs_length(plt, res, results_dir):
    """accuracy_vs_length.png: exact match and token accuracy per source length, every model that did not fail."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, m in res["models"].items():
        if model_failed(m):
            continue
        b = m["by_length"]
        ax.plot(b["length"], b["exact_match"], "-o", color=MODEL_COLORS.get(kind), ms=4, label=f"{kind} exact match")
        ax.plot(b["length"], b["token_acc"], ":", color=MODEL_COLORS.get(kind), label=f"{kind} token acc")
    ax.axvline(res["config"]["max_len"] + 0.5, color="grey", lw=1)
    ax.text(res["config"]["max_len"] + 0.7, 0.03, "unseen lengths →", color="grey", fontsize=8)
    ax.set_xlabel("source length (tokens)"); ax.set_ylabel("accuracy (test sets)"); ax.set_ylim(-0.02, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # lengths are whole tokens
    ax.grid(alpha=0.3); ax.legend(fontsize=8); ax.set_title("accuracy vs sequence length")
    save_figure(fig, os.path.join(results_dir, "accuracy_vs_length.png")); plt.close(fig)


def draw_heatmap(ax, ex, max_train_len=None):
    """One attention map on a matplotlib axis: rows are output tokens (then EOS), columns source tokens.

    Returns the AxesImage (for a colorbar). Lengths above max_train_len are marked as unseen in the title.
    """
    w = np.asarray(ex["weights"])
    im = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(w.shape[1])); ax.set_xticklabels([str(x) for x in ex["source"]])
    ax.set_yticks(range(w.shape[0])); ax.set_yticklabels(row_labels(ex))
    ax.set_xlabel("source"); ax.set_ylabel("output")
    ok = ex["prediction"] == ex["source"][::-1]
    unseen = max_train_len is not None and len(ex["source"]) > max_train_len
    ax.set_title(f"len {len(ex['source'])}{' (unseen length)' if unseen else ''}: {'correct' if ok else 'wrong'}",
                 fontsize=9)
    return im


def row_labels(ex):
    """The output token of each row of an attention example's weights (older results lack "output": their
    prediction then EOS, numbered rows where the model emitted PAD or SOS)."""
    labels = ex.get("output") or [str(x) for x in ex["prediction"]] + ["EOS"]
    rows = len(ex["weights"])
    return labels[:rows] if len(labels) >= rows else [str(r + 1) for r in range(rows)]


def describe_test_lengths(res):
    """'lengths 2..10 (drawn from 1..10)': the lengths the test split really holds. Short lengths have few
    distinct sequences (length 1: vocab_size), so a split can hold none of them."""
    lo, hi = res["config"]["min_len"], res["config"]["max_len"]
    counts = res.get("data", {}).get("test_length_counts")
    present = [L for L, n in enumerate(counts) if n] if counts is not None else []
    if not present or (present[0], present[-1]) == (lo, hi):
        return f"lengths {lo}..{hi}"
    return f"lengths {present[0]}..{present[-1]} (drawn from {lo}..{hi})"


def report(res, results_dir, log=print):
    """Print the comparison and length tables and (re)write summary files and plots from a results dict."""
    write_summary(res, results_dir)
    written = make_plots(res, results_dir)
    log(f"\nTest set ({describe_test_lengths(res)}, {res['config']['n_test']} sequences, free-running greedy decoding) "
        f"on {res.get('device')}:\n")
    log(comparison_table(res))
    log("\nExact match by source length (beyond max_len: never seen in training):\n")
    log(length_table(res) or "(none: no model finished training)")
    log(f"\nwrote summary.json, summary.csv, {', '.join(written)} in {results_dir}")


# -----------------------------------------------------------------------------
# main pipeline and prediction
# -----------------------------------------------------------------------------
def hardware_string(device):
    """Human-readable name of the hardware a run used (GPU name, or CPU model and core count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


def run(cfg, log=print):
    """Generate data, train and evaluate both models, write results; returns the results dict.

    Every setting, the device and the results folder are checked first (UserError, nothing trained). Results
    are written after each model finishes, so a run killed halfway keeps the finished model's results. A model
    whose loss became NaN or infinite is recorded as failed (see model_failed; no weights file) and the next
    model still trains.
    """
    validate_config(cfg)
    device = pick_device(cfg["device"])
    results_dir = cfg["results_dir"]
    check_results_dir(results_dir)
    t_data = time.perf_counter()
    splits = make_splits(cfg)
    train_set = set(splits["train"])
    overlap = sum(s in train_set for s in splits["val"] + splits["test"])
    if overlap:  # guaranteed by make_splits; checked here so a broken change can never go unnoticed
        raise RuntimeError(f"{overlap} validation/test sequences also appear in the training set")
    data = {k: SeqDataset(v, device) for k, v in splits.items() if v}  # no "gen" when gen_max_len == max_len
    gen = (f"{len(splits['gen'])} at lengths {cfg['max_len'] + 1}..{cfg['gen_max_len']}" if splits["gen"]
           else "no length-generalisation sets")
    log(f"data: {len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} test sequences, "
        f"lengths {cfg['min_len']}..{cfg['max_len']}, + {gen}; no val/test sequence is in train "
        f"({time.perf_counter() - t_data:.1f}s) on {device}")
    res = dict(config=dict(cfg), device=str(device), hardware=hardware_string(device), torch=str(torch.__version__),
               data=dict(train_length_counts=np.bincount([len(s) for s in splits["train"]]),
                         test_length_counts=np.bincount([len(s) for s in splits["test"]]),
                         train_test_overlap=0),
               models={})
    # a few test sequences (longest ones, plus one medium) for the attention heatmaps
    by_len = sorted(splits["test"], key=len, reverse=True)
    heat_seqs = [by_len[0], next((s for s in by_len if len(s) <= max(cfg["min_len"], cfg["max_len"] // 2 + 1)), by_len[-1]),
                 splits["gen"][-1] if splits["gen"] else by_len[1 % len(by_len)]]
    for kind in MODEL_KINDS:
        model, hist, info = train_model(cfg, kind, data, device, log)
        res["models"][kind] = m = model_record(model, hist, info, data, heat_seqs, device)
        weights = os.path.join(results_dir, f"{kind}_model.pt")
        if model_failed(m):  # an earlier run's weights here would not match the config.json written below
            remove_file(weights)
        else:
            save_weights(weights, model)
        save_pickle(os.path.join(results_dir, "results.pkl"), res)
        atomic_write_bytes(os.path.join(results_dir, "config.json"), json.dumps(dict(cfg), indent=2).encode())
        if model_failed(m):
            log(f"[{kind}] FAILED: {info['failure_reason']}; trained {info['train_seconds']:.1f}s, no test scores, "
                "no weights saved")
        else:
            log(f"[{kind}] test exact match {m['test']['exact_match']:.4f}  token acc {m['test']['token_acc']:.4f}  "
                f"F1 {m['test']['f1']:.4f}  trained {info['train_seconds']:.1f}s, best epoch {info['best_epoch']} "
                f"({info['stop_reason']})")
    report(res, results_dir, log)
    return res


def model_record(model, hist, info, data, heat_seqs, device):
    """One model's entry in res["models"]: history, info, test scores, accuracy by length (test and
    generalisation sets) and attention maps of heat_seqs. A failed run has test=None and by_length=None."""
    if info["status"] == "failed":
        return dict(history=hist, info=info, test=None, by_length=None, attention_examples=[])
    gens = [data["test"]] + ([data["gen"]] if "gen" in data else [])
    return dict(history=hist, info=info, test=evaluate(model, data["test"]), by_length=accuracy_by_length(model, gens),
                attention_examples=attention_examples(model, heat_seqs, device))


def failure_line(res):
    """One line naming every model of `res` whose run failed and why, or None when none failed."""
    failed = [f"the {kind} model failed ({m['info']['failure_reason']})" for kind, m in res["models"].items()
              if model_failed(m)]
    if not failed:
        return None
    return (f"{'; '.join(failed)}: recorded in {os.path.join(res['config']['results_dir'], 'results.pkl')}; "
            "train again with a smaller --lr")


def load_model(results_dir, kind="attention", device="cpu"):
    """Rebuild a saved model from results_dir/config.json and {kind}_model.pt (weights_only=True)."""
    cfg_path, w_path = os.path.join(results_dir, "config.json"), os.path.join(results_dir, f"{kind}_model.pt")
    for p in (cfg_path, w_path):
        if not os.path.exists(p):
            why = "its training failed or did not finish" if os.path.exists(cfg_path) else "nothing was trained there"
            raise UserError(f"{p} not found ({why}): train first with "
                            f"`python seq2seq_project.py --results-dir {results_dir}`")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        model = build_model(cfg, use_attention=(kind == "attention"))
        model.load_state_dict(torch.load(w_path, map_location=device, weights_only=True))
    except Exception as e:
        raise UserError(f"could not load the saved model from {w_path} / {cfg_path} ({type(e).__name__}: {e})") from None
    return model.to(device).eval(), cfg


def predict(tokens, results_dir, device="cpu", png=None, log=print):
    """Reverse `tokens` with the saved attention model; print the output and its attention map as text.

    Raises UserError when a token lies outside 0..vocab_size-1 of the saved model. Returns the output list.
    """
    model, cfg = load_model(results_dir, "attention", device)
    bad = [t for t in tokens if not 0 <= t < cfg["vocab_size"]]
    if bad:
        raise UserError(f"token(s) {bad} outside the vocabulary 0..{cfg['vocab_size'] - 1} of the saved model")
    if not tokens:
        raise UserError("--predict needs at least one token")
    ex = attention_examples(model, [tuple(tokens)], device)[0]
    log(" ".join(str(x) for x in ex["prediction"]))
    if not cfg["min_len"] <= len(tokens) <= cfg["max_len"]:
        log(f"(note: trained on lengths {cfg['min_len']}..{cfg['max_len']}; length {len(tokens)} was never seen)")
    w = ex["weights"]
    log("\nattention (rows: output token, columns: source token, weights x100):")
    log("       " + "".join(f"{s:>5}" for s in tokens))
    for label, row in zip(row_labels(ex), w):
        log(f"{label:>5}  " + "".join(f"{100 * v:5.0f}" for v in row))
    if png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(1 + 0.5 * len(tokens), 1 + 0.5 * len(w)))
        draw_heatmap(ax, ex, cfg["max_len"])
        save_figure(fig, png); plt.close(fig)
        log(f"wrote {png}")
    return ex["prediction"]


# -----------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------
def str2bool(s):
    """argparse type for boolean flags: true/false, yes/no, 1/0."""
    if s.lower() in ("1", "true", "yes", "y"):
        return True
    if s.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def config_help() -> dict:
    """{key: its comment in CONFIG above}: the CONFIG dict's comments are the flags' help, so the
    description and units live in one place. Keys without a comment get an empty help."""
    import re
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    block = source[source.index("CONFIG = dict("):]
    block = block[:block.index("\n)\n")]
    return {m[1]: m[2].strip() for m in re.finditer(r"^\s+(\w+)=[^#\n]*#\s*(.*)$", block, re.M)}


def build_parser():
    """The argparse parser: --report / --predict modes plus one flag per CONFIG key, each with its
    CONFIG comment, accepted range (RANGES) and default as help."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--report", action="store_true", help="rebuild tables and plots from results-dir/results.pkl")
    mode.add_argument("--predict", type=int, nargs="+", metavar="TOKEN",
                      help="reverse these integers with the saved attention model and print its attention map")
    p.add_argument("--predict-png", default=None, metavar="PATH", help="with --predict: also draw the attention map here")
    helps = config_help()
    for key, default in CONFIG.items():
        kind = str2bool if isinstance(default, bool) else type(default)
        accepted = f"; {RANGES[key][1]}" if key in RANGES else ""
        p.add_argument(flag(key), type=kind, default=default, help=helps.get(key, " ") + accepted,
                       metavar=kind.__name__.upper() if kind is not str2bool else "BOOL")
    return p


def main(argv=None):
    """CLI entry point; returns the process exit status (0 ok, 1 a model's training failed, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # unknown flags / bad types: argparse prints usage and exits 2
    cfg = {k: getattr(args, k) for k in CONFIG}
    try:
        check_mode_flags(args, cfg)
        if args.report:
            res = load_results(cfg["results_dir"])
            report(res, cfg["results_dir"])
        elif args.predict is not None:
            predict(args.predict, cfg["results_dir"], pick_device(cfg["device"]), args.predict_png)
        else:
            failure = failure_line(run(cfg))
            if failure:
                print(f"{parser.prog}: error: {failure}", file=sys.stderr)
                return 1
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        print(f"{parser.prog}: error: out of memory: use smaller --n-train, "
              "--max-len, --gen-max-len, --vocab-size, --emb-dim, --hidden-size or --batch-size", file=sys.stderr)
        return 1
    return 0


def is_out_of_memory(err):
    """Whether an exception is an allocation failure: NumPy's MemoryError, torch.cuda.OutOfMemoryError (CUDA), or the
    RuntimeError of torch's CPU allocator ("can't allocate memory")."""
    return (isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError))
            or "can't allocate memory" in str(err))


def check_mode_flags(args, cfg):
    """Raise UserError for flags that the chosen mode would ignore: --predict-png without --predict, and
    training settings given with --report (which redraws saved results) or --predict (which uses the saved
    model's settings; only --results-dir and --device apply)."""
    if args.predict_png is not None and args.predict is None:
        raise UserError("--predict-png only works with --predict (it draws the attention map of the tokens given "
                        "to --predict): add --predict TOKEN ..., or drop --predict-png")
    mode = "--report" if args.report else "--predict" if args.predict is not None else None
    if mode is None:
        return
    used = ("results_dir", "device") if mode == "--predict" else ("results_dir",)
    ignored = [flag(k) for k in CONFIG if k not in used and cfg[k] != CONFIG[k]]
    if ignored:
        raise UserError(f"{', '.join(ignored)}: no effect with {mode}, which uses the settings saved in "
                        f"{cfg['results_dir']}: drop {'it' if len(ignored) == 1 else 'them'}, or train with them "
                        "(without --report/--predict)")


if __name__ == "__main__":
    sys.exit(main())
