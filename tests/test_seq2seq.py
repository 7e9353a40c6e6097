"""Tests for seq2seq_project.py: data invariants, attention, shapes, a real (tiny) learning check, and the CLI."""
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import seq2seq_project as s2s  # noqa: E402

SCRIPT = os.path.join(ROOT, "seq2seq_project.py")

# Small but real: digits 0..5, lengths 1..5. Trains in well under a minute on 2 CPU cores.
TINY = dict(s2s.CONFIG, vocab_size=6, min_len=1, max_len=5, n_train=2000, n_val=200, n_test=200,
            gen_max_len=7, n_gen_per_len=20, emb_dim=16, hidden_size=32, epochs=5, batch_size=64,
            lr=1e-2, patience=3, max_train_seconds=1e9, device="cpu", seed=1)  # no wall-clock cap: deterministic


def small_cfg(**kw):
    return dict(s2s.CONFIG, **dict(dict(n_train=400, n_val=100, n_test=100, n_gen_per_len=5, device="cpu"), **kw))


# ---------------------------------------------------------------- data
def test_splits_disjoint_seeded_and_in_range():
    cfg = small_cfg(n_train=2000, n_val=300, n_test=300)
    a, b = s2s.make_splits(cfg), s2s.make_splits(cfg)
    assert a == b, "splits must be reproducible from the seed"
    assert s2s.make_splits(dict(cfg, seed=cfg["seed"] + 1))["train"] != a["train"]
    train, val, test = set(a["train"]), set(a["val"]), set(a["test"])
    assert len(train) == 2000 and len(val) == 300 and len(test) == 300  # no duplicates inside a split
    assert not (train & test) and not (train & val) and not (val & test)
    for seq in a["train"] + a["val"] + a["test"]:
        assert 1 <= len(seq) <= 10 and all(0 <= x < 10 for x in seq)
    assert {len(x) for x in a["gen"]} == set(range(11, 21))
    # lengths are spread over the whole range (uniform draw, rejection only thins the tiny lengths)
    assert {len(x) for x in a["train"]} == set(range(1, 11))


def test_dataset_target_is_reverse_and_specials_only_outside_sequences():
    seqs = [(3,), (1, 2, 3), (9, 0, 0, 4, 5)]
    d = s2s.SeqDataset(seqs, torch.device("cpu"))
    assert d.src.shape == (3, 5) and d.tgt.shape == (3, 6)
    for i, seq in enumerate(seqs):
        n = len(seq)
        src, tgt = d.src[i].tolist(), d.tgt[i].tolist()
        assert s2s.decode(src[:n]) == list(seq)
        assert s2s.decode(tgt) == list(seq)[::-1]
        assert tgt[n] == s2s.EOS
        # PAD/SOS/EOS never inside a sequence; only PAD after it
        assert all(t >= s2s.N_SPECIAL for t in src[:n]) and all(t >= s2s.N_SPECIAL for t in tgt[:n])
        assert all(t == s2s.PAD for t in src[n:]) and all(t == s2s.PAD for t in tgt[n + 1:])
    # batches are padded only to their own longest member
    batches = list(d.batches(2))
    assert batches[0][0].shape == (2, 3) and batches[0][2].shape == (2, 4)
    assert batches[1][0].shape == (1, 5)


def test_make_splits_rejects_impossible_and_bad_configs():
    with pytest.raises(s2s.UserError, match="min-len"):
        s2s.validate_config(small_cfg(min_len=5, max_len=3))
    with pytest.raises(s2s.UserError, match="distinct sequences"):
        s2s.validate_config(small_cfg(vocab_size=2, min_len=1, max_len=3))  # only 14 sequences exist


# ---------------------------------------------------------------- model
def test_additive_attention_sums_to_one_and_zero_on_padding():
    torch.manual_seed(0)
    att = s2s.AdditiveAttention(query_dim=8, key_dim=6, attn_dim=5)
    keys = torch.randn(3, 4, 6)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    context, w = att(torch.randn(3, 8), keys, att.project(keys), mask)
    assert context.shape == (3, 6) and w.shape == (3, 4)
    assert torch.allclose(w.sum(-1), torch.ones(3), atol=1e-6)
    assert (w[~mask] == 0).all() and (w[mask] > 0).all()
    assert torch.allclose(w[2, 0], torch.tensor(1.0))
    assert torch.allclose(context, torch.einsum("bs,bsd->bd", w, keys), atol=1e-6)


def test_shapes_and_masking_through_encoder_decoder_with_mixed_lengths():
    torch.manual_seed(0)
    cfg = small_cfg(emb_dim=8, hidden_size=12, num_layers=2)
    seqs = [(1, 2, 3, 4, 5, 6, 7), (4,), (8, 9, 0)]
    d = s2s.SeqDataset(seqs, torch.device("cpu"))
    model = s2s.build_model(cfg, use_attention=True).eval()
    enc_out, (h, c) = model.encoder(d.src, d.lengths)
    assert enc_out.shape == (3, 7, 24) and h.shape == (2, 3, 24) and c.shape == (2, 3, 24)
    assert (enc_out[1, 1:] == 0).all() and (enc_out[2, 3:] == 0).all()  # packed: nothing computed on padding
    logits, attn = model(d.src, d.lengths, tgt=d.tgt, teacher_forcing_ratio=1.0)
    V = cfg["vocab_size"] + s2s.N_SPECIAL
    assert logits.shape == (3, 8, V) and attn.shape == (3, 8, 7)
    assert torch.allclose(attn.sum(-1), torch.ones(3, 8), atol=1e-5)
    assert (attn[1, :, 1:] == 0).all() and (attn[2, :, 3:] == 0).all()
    # padding must not change a sequence's output: alone vs. in a padded batch
    alone, _ = model(d.src[1:2, :1], d.lengths[1:2], tgt=d.tgt[1:2, :2], teacher_forcing_ratio=1.0)
    assert torch.allclose(alone[0], logits[1, :2], atol=1e-5)
    base = s2s.build_model(cfg, use_attention=False).eval()
    blogits, battn = base(d.src, d.lengths, max_steps=9)
    assert battn is None and blogits.shape[0] == 3 and blogits.shape[2] == V and blogits.shape[1] <= 9
    assert base.decoder.attention is None


def test_free_running_ignores_gold_tokens_and_starts_from_sos():
    torch.manual_seed(0)
    model = s2s.build_model(small_cfg(emb_dim=8, hidden_size=12), use_attention=True).eval()
    d = s2s.SeqDataset([(1, 2, 3), (4, 5, 6)], torch.device("cpu"))
    with torch.no_grad():
        a, _ = model(d.src, d.lengths, tgt=d.tgt, teacher_forcing_ratio=0.0)
        b, _ = model(d.src, d.lengths, tgt=torch.full_like(d.tgt, 7), teacher_forcing_ratio=0.0)
        g, _ = model(d.src, d.lengths, max_steps=d.tgt.size(1))
        tf, _ = model(d.src, d.lengths, tgt=d.tgt, teacher_forcing_ratio=1.0)
    assert torch.allclose(a, b)  # with ratio 0 the gold tokens are never used
    n = g.size(1)
    assert torch.allclose(a[:, :n], g)
    assert torch.allclose(tf[:, 0], a[:, 0])  # the first step sees SOS either way, never the first gold token
    assert not torch.allclose(tf[:, 1:], a[:, 1:])


def test_clean_predictions_and_metrics_on_a_known_case():
    E = s2s.EOS
    pred = torch.tensor([[5, E, 7, 8], [E, 4, 4, 4]])
    assert s2s.clean_predictions(pred).tolist() == [[5, E, 0, 0], [E, 0, 0, 0]]

    class Oracle(torch.nn.Module):
        """Emits the reversed source, except for the sequences listed in `wrong` (first token off by one)."""
        use_attention = False

        def __init__(self, wrong):
            super().__init__()
            self.wrong = wrong

        def forward(self, src, lengths, tgt=None, teacher_forcing_ratio=0.0, max_steps=None):
            B, S = src.shape
            T = tgt.size(1) if tgt is not None else max_steps
            out = torch.full((B, T), s2s.PAD)
            for i in range(B):
                n = int(lengths[i])
                rev = src[i, :n].flip(0).tolist() + [E]
                if i in self.wrong:
                    rev[0] = s2s.N_SPECIAL + (rev[0] - s2s.N_SPECIAL + 1) % 10
                out[i, :n + 1] = torch.tensor(rev)
            return torch.nn.functional.one_hot(out, 13).float() * 20, None

    d = s2s.SeqDataset([(1, 2), (3, 4, 5), (6,), (7, 8)], torch.device("cpu"))
    r = s2s.evaluate(Oracle(wrong={1}), d)
    assert r["exact_match"] == pytest.approx(0.75)
    assert r["token_acc"] == pytest.approx(11 / 12)  # 12 target tokens (EOS included), 1 wrong
    assert r["n"] == 4 and 0 < r["f1"] < 1 and r["loss"] > 0
    assert s2s.evaluate(Oracle(wrong=set()), d)["f1"] == pytest.approx(1.0)


# ---------------------------------------------------------------- a real run (tiny) shared by the CLI tests
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq2seq")
    cfg = dict(TINY, results_dir=str(out))
    logs = []
    res = s2s.run(cfg, log=logs.append)
    return cfg, res, out, logs


def test_tiny_training_learns_to_reverse(tiny_run):
    cfg, res, out, _ = tiny_run
    att = res["models"]["attention"]
    # a real learning check on held-out sequences, free-running greedy decoding
    assert att["test"]["exact_match"] >= 0.95, att["test"]
    assert att["test"]["token_acc"] >= 0.98
    assert att["history"]["val_loss"][-1] < att["history"]["val_loss"][0]
    assert att["info"]["best_epoch"] == 1 + int(np.argmax(att["history"]["val_exact_match"]))
    # the attention map of a correct reversal concentrates on the mirrored source position
    ex = att["attention_examples"][0]
    n = len(ex["source"])
    if ex["prediction"] == ex["source"][::-1]:
        assert np.mean(np.argmax(ex["weights"][:n], axis=1) == np.arange(n)[::-1]) >= 0.8
    assert set(res["models"]) == {"attention", "baseline"}


def test_results_files_are_plain_and_complete(tiny_run):
    cfg, res, out, _ = tiny_run
    for name in ("results.pkl", "summary.json", "summary.csv", "config.json", "attention_model.pt",
                 "baseline_model.pt", "loss_curves.png", "accuracy_curves.png", "accuracy_vs_length.png",
                 "attention_heatmaps.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.tmp"))
    # loadable with pickle alone: torch and this project blocked
    code = ("import sys, pickle; sys.modules['torch'] = None; sys.modules['seq2seq_project'] = None; "
            f"r = pickle.load(open({str(out / 'results.pkl')!r}, 'rb')); "
            "print(sorted(r['models']), r['models']['attention']['test']['exact_match'])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "['attention', 'baseline']" in p.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["attention"]["test"]["exact_match"] == res["models"]["attention"]["test"]["exact_match"]
    sd = torch.load(out / "attention_model.pt", weights_only=True)
    assert any("attention" in k for k in sd)
    bl = res["models"]["baseline"]["by_length"]
    # test-set lengths (1..5; the tiniest may be missing: only 6 sequences of length 1 exist) then 6..7 unseen
    assert list(bl["length"]) == sorted(bl["length"]) and set(bl["length"]) <= set(range(1, 8))
    assert {6, 7} <= set(bl["length"]) and bl["n"].sum() == TINY["n_test"] + 2 * TINY["n_gen_per_len"]


def test_predict_prints_reversed_sequence(tiny_run, capsys):
    cfg, _, out, _ = tiny_run
    assert s2s.main(["--predict", "3", "1", "4", "2", "--results-dir", str(out), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "2 4 1 3"
    assert any(line.strip().startswith("EOS") for line in lines)  # the attention map as text


def test_predict_png(tiny_run, tmp_path):
    _, _, out, _ = tiny_run
    png = tmp_path / "map.png"
    assert s2s.main(["--predict", "1", "2", "--results-dir", str(out), "--predict-png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rebuilds_from_pickles(tiny_run, tmp_path, capsys):
    _, res, out, _ = tiny_run
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    (copy_dir / "results.pkl").write_bytes((out / "results.pkl").read_bytes())
    assert s2s.main(["--report", "--results-dir", str(copy_dir)]) == 0
    text = capsys.readouterr().out
    assert "| attention |" in text and "| baseline |" in text
    assert f"{res['models']['attention']['test']['exact_match']:.4f}" in text
    for name in ("summary.json", "summary.csv", "loss_curves.png", "accuracy_vs_length.png", "attention_heatmaps.png"):
        assert (copy_dir / name).exists(), name


def test_killed_run_keeps_finished_results(tmp_path, monkeypatch):
    real = s2s.train_model

    def die_on_baseline(cfg, kind, *a, **k):
        if kind == "baseline":
            raise KeyboardInterrupt
        return real(cfg, kind, *a, **k)

    monkeypatch.setattr(s2s, "train_model", die_on_baseline)
    cfg = dict(TINY, n_train=300, n_val=50, n_test=50, epochs=1, n_gen_per_len=2, results_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        s2s.run(cfg, log=lambda *_: None)
    res = s2s.load_results(str(tmp_path))
    assert list(res["models"]) == ["attention"]
    assert s2s.main(["--report", "--results-dir", str(tmp_path)]) == 0  # a partial run still reports


# ---------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors(tiny_run, tmp_path, capsys):
    _, _, out, _ = tiny_run
    assert s2s.main(["--predict", "3", "9", "--results-dir", str(out)]) == 2  # vocab is 0..5 in TINY
    assert "outside the vocabulary" in capsys.readouterr().err
    assert s2s.main(["--min-len", "5", "--max-len", "3", "--results-dir", str(tmp_path)]) == 2
    assert "must not exceed" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written
    assert s2s.main(["--predict", "1", "--results-dir", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "results.pkl").write_bytes(b"not a pickle")
    assert s2s.main(["--report", "--results-dir", str(tmp_path)]) == 2
    assert str(tmp_path / "results.pkl") in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        s2s.main(["--no-such-flag"])
    assert e.value.code == 2


def test_cli_exit_status_and_no_traceback(tiny_run, tmp_path):
    _, _, out, _ = tiny_run
    for args, needle in ((["--predict", "3", "12", "--results-dir", str(out)], "outside the vocabulary"),
                         (["--min-len", "4", "--max-len", "2", "--results-dir", str(tmp_path)], "min-len"),
                         (["--epochs", "many"], "invalid int value")):
        p = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert p.returncode == 2, (args, p.stderr)
        assert needle in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_help_describes_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        s2s.build_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for key, default in s2s.CONFIG.items():
        flag = "--" + key.replace("_", "-")
        after = out.split(flag, 2)[2]  # the options list, past the usage line
        described = after.split(" --", 1)[0]
        assert f"(default: {default})" in described, flag
        assert len(described.split("(default:")[0].split(maxsplit=1)[-1]) > 8, flag  # real words
    assert "Adam learning rate; a number in (0, 1e37] (default: 0.003)" in out  # the accepted range, then the default


def test_report_names_the_lengths_the_test_split_really_holds(tmp_path, capsys):
    """The committed run's test split holds no length-1 sequence (only 10 exist, all drawn into
    train and validation): the report says 2..10, not the configured 1..10."""
    with open(os.path.join(ROOT, "results", "reference_seq2seq", "results.pkl"), "rb") as f:
        res = pickle.load(f)
    counts = res["data"]["test_length_counts"]
    assert counts[1] == 0 and counts[2] > 0 and res["config"]["min_len"] == 1
    assert s2s.describe_test_lengths(res) == "lengths 2..10 (drawn from 1..10)"
    assert s2s.describe_test_lengths(dict(res, data={})) == "lengths 1..10"  # older pickles: the configured range
    (tmp_path / "results.pkl").write_bytes(pickle.dumps(res))
    assert s2s.main(["--report", "--results-dir", str(tmp_path)]) == 0
    assert "Test set (lengths 2..10 (drawn from 1..10), 1000 sequences" in capsys.readouterr().out


# ---------------------------------------------------------------- every setting checked before any work
UNAVAILABLE_DEVICE = "cuda" if torch.backends.mps.is_available() else "mps"
BAD_SETTINGS = [  # (flags, the flag the one error line must name)
    (["--gen-max-len", "5"], "--gen-max-len"), (["--n-gen-per-len", "0"], "--n-gen-per-len"),
    (["--n-gen-per-len", "-1"], "--n-gen-per-len"), (["--seed", "-1"], "--seed"), (["--seed", str(2**32)], "--seed"),
    (["--dropout", "2"], "--dropout"), (["--dropout", "-1"], "--dropout"), (["--dropout", "nan"], "--dropout"),
    (["--dropout", "0.3"], "--dropout"),  # with --num-layers 1 it would be ignored
    (["--device", UNAVAILABLE_DEVICE], "--device"), (["--device", "meta"], "--device"), (["--device", "gpu"], "--device"),
    (["--vocab-size", "3", "--max-len", "3"], "--n-train"),  # 12,000 sequences asked of 39
    (["--vocab-size", "3", "--max-len", "3", "--n-train", "10", "--n-val", "5", "--n-test", "5"], "--n-gen-per-len"),
    (["--vocab-size", "1"], "--vocab-size"), (["--min-len", "0"], "--min-len"), (["--max-len", "0"], "--max-len"),
    (["--max-len", str(10**21), "--gen-max-len", str(10**21)], "--max-len"),
    (["--n-train", "0"], "--n-train"), (["--n-val", "-3"], "--n-val"), (["--n-test", "0"], "--n-test"),
    (["--emb-dim", "0"], "--emb-dim"), (["--hidden-size", "0"], "--hidden-size"), (["--num-layers", "0"], "--num-layers"),
    (["--epochs", "0"], "--epochs"), (["--batch-size", "0"], "--batch-size"), (["--patience", "0"], "--patience"),
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr"), (["--lr", "-0.1"], "--lr"),
    (["--lr", "1e38"], "--lr"), (["--grad-clip", "-1"], "--grad-clip"), (["--grad-clip", "0"], "--grad-clip"),
    (["--grad-clip", "inf"], "--grad-clip"), (["--teacher-forcing-ratio", "1.5"], "--teacher-forcing-ratio"),
    (["--teacher-forcing-min", "-0.1"], "--teacher-forcing-min"),
    (["--teacher-forcing-ratio", "0.3"], "--teacher-forcing-min"),  # above the ratio it falls from
    (["--max-train-seconds", "0"], "--max-train-seconds"), (["--max-train-seconds", "nan"], "--max-train-seconds"),
    (["--predict-png", "map.png"], "--predict-png"),  # without --predict: no training run instead
    (["--report", "--epochs", "3"], "--epochs"), (["--predict", "1", "2", "--lr", "0.1"], "--lr"),
]


@pytest.fixture
def no_work(monkeypatch):
    """Any data drawing or training fails the test: a refused setting must stop before both."""
    def forbidden(*a, **k):
        raise AssertionError("work started despite a bad setting")
    monkeypatch.setattr(s2s, "make_splits", forbidden)
    monkeypatch.setattr(s2s, "train_model", forbidden)


@pytest.mark.parametrize("flags,named", BAD_SETTINGS, ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_a_bad_setting_is_one_line_naming_its_flag(flags, named, tmp_path, capsys, no_work):
    out = tmp_path / "out"
    assert s2s.main([*flags, "--results-dir", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "error: " in err[0] and named in err[0], err
    assert not out.exists()  # refused before the results folder was even made


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_results_dir_that_cannot_hold_results_is_refused_before_training(where, tmp_path, capsys, no_work):
    (tmp_path / "f").write_text("not a folder")
    out = tmp_path / "f" if where == "a file" else tmp_path / "f" / "results"
    assert s2s.main(["--results-dir", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"--results-dir {out}" in err[0], err
    assert (tmp_path / "f").read_text() == "not a folder"


def test_every_numeric_setting_has_a_range_and_the_defaults_lie_in_it():
    numeric = {k for k, v in s2s.CONFIG.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric == set(s2s.RANGES)
    s2s.validate_config(dict(s2s.CONFIG))  # the defaults are accepted
    s2s.validate_config(dict(s2s.CONFIG, gen_max_len=s2s.CONFIG["max_len"]))  # no generalisation sets is allowed
    assert s2s.distinct_sequences(3, 1, 3, 10**6) == 3 + 9 + 27
    assert s2s.distinct_sequences(10, 1, 10**18, 500) == 501  # capped: no huge powers computed


@pytest.mark.parametrize("flags,named", [
    (["--vocab-size", "3", "--max-len", "3", "--n-train", "10", "--n-val", "5", "--n-test", "5"], "--n-gen-per-len"),
    (["--seed", "-1"], "--seed"), (["--dropout", "2", "--num-layers", "2"], "--dropout")])
def test_bad_settings_from_the_shell_exit_2_without_traceback(flags, named, tmp_path):
    """The real program in a subprocess; the first case used to hang drawing 100 distinct sequences of
    length 4 from only 81."""
    p = subprocess.run([sys.executable, SCRIPT, *flags, "--results-dir", str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2 and p.stdout == "", (p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("seq2seq_project.py: error: ") and named in lines[0], p.stderr


def test_a_write_that_fails_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    def disk_full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")
    (tmp_path / "summary.json").write_text("earlier")
    monkeypatch.setattr(s2s.os, "replace", disk_full)
    with pytest.raises(s2s.UserError, match="No space left on device") as e:
        s2s.atomic_write_bytes(str(tmp_path / "summary.json"), b"new")
    assert str(tmp_path / "summary.json") in str(e.value)
    assert (tmp_path / "summary.json").read_text() == "earlier" and not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- a diverged run is a result
TINY_CLI = ["--vocab-size", "4", "--max-len", "4", "--n-train", "200", "--n-val", "20", "--n-test", "20",
            "--gen-max-len", "5", "--n-gen-per-len", "3", "--emb-dim", "4", "--hidden-size", "8", "--epochs", "2",
            "--device", "cpu"]


def test_a_diverged_run_is_recorded_and_report_goes_on(tmp_path, capsys):
    """--lr 1e37 is accepted (Adam's first step, 1e38, still fits in float32) and sends the loss to inf:
    both models are recorded as failed, the plots are drawn, the exit status is 1, --report works."""
    (tmp_path / "attention_model.pt").write_bytes(b"an earlier run's weights")
    (tmp_path / "attention_heatmaps.png").write_bytes(b"an earlier run's plot")
    assert s2s.main([*TINY_CLI, "--lr", "1e37", "--results-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 1 and "the attention model failed" in err[0] and "--lr" in err[0], err
    res = s2s.load_results(str(tmp_path))
    for m in res["models"].values():
        assert m["info"]["status"] == "failed" and "loss became" in m["info"]["failure_reason"]
        assert m["test"] is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["models"]["baseline"]["info"]["status"] == "failed"
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    # nothing left that belongs to an earlier run: no weights to --predict with, no heatmaps of another model
    assert not (tmp_path / "attention_model.pt").exists() and not (tmp_path / "attention_heatmaps.png").exists()
    assert s2s.main(["--report", "--results-dir", str(tmp_path)]) == 0
    assert "| attention | failed: " in capsys.readouterr().out
    assert s2s.main(["--predict", "1", "2", "--results-dir", str(tmp_path)]) == 2
    assert "failed" in capsys.readouterr().err


def test_a_nan_in_the_middle_of_one_run_leaves_the_other_scored(tmp_path, monkeypatch, capsys):
    """The attention model's loss turns NaN in epoch 2 (an output bias set to NaN); the baseline trains on
    and is scored. Also: --gen-max-len equal to --max-len (no generalisation sets)."""
    models, real_build, real_batches = [], s2s.build_model, s2s.epoch_batches

    def build(cfg, use_attention):
        models.append(real_build(cfg, use_attention))
        return models[-1]

    def batches(train, cfg, gen, desc):
        if desc.startswith("attention epoch 2/"):
            with torch.no_grad():
                models[-1].decoder.out.bias.fill_(float("nan"))
        yield from real_batches(train, cfg, gen, desc)

    monkeypatch.setattr(s2s, "build_model", build)
    monkeypatch.setattr(s2s, "epoch_batches", batches)
    flags = [*TINY_CLI, "--gen-max-len", "4", "--lr", "0.01", "--results-dir", str(tmp_path)]
    assert s2s.main(flags) == 1
    assert "the attention model failed (training loss became nan in epoch 2)" in capsys.readouterr().err
    res = s2s.load_results(str(tmp_path))
    att, base = res["models"]["attention"], res["models"]["baseline"]
    assert att["info"]["status"] == "failed" and np.isfinite(att["history"]["train_loss_running"][0])
    assert len(att["history"]["epoch"]) == 2 and np.isnan(att["history"]["train_loss_running"][1])
    assert base["info"]["status"] == "ok" and 0 <= base["test"]["exact_match"] <= 1
    assert set(base["by_length"]["length"]) <= {1, 2, 3, 4}  # no generalisation lengths
    assert s2s.main(["--report", "--results-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| attention | failed: training loss became nan in epoch 2 |" in text
    assert re.search(r"^\| baseline \| [01]\.\d{4} \|", text, re.M), text  # scored
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["accuracy_curves.png", "accuracy_vs_length.png",
                                                             "loss_curves.png"]
    assert (tmp_path / "baseline_model.pt").exists() and not (tmp_path / "attention_model.pt").exists()


def test_out_of_memory_is_one_line_and_other_errors_still_raise(monkeypatch, capsys):
    def no_memory(cfg):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 128000000384 bytes.")
    monkeypatch.setattr(s2s, "run", no_memory)
    assert s2s.main([]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "out of memory" in err[0] and "--hidden-size" in err[0], err

    def broken(cfg):
        raise RuntimeError("a bug, not a setting")
    monkeypatch.setattr(s2s, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):  # a real bug keeps its traceback
        s2s.main([])
