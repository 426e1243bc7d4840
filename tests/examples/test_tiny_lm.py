"""examples/tiny_lm.py: the perplexity helper against a float64 reference; the splits never overlap;
a micro config trained, cached, reloaded (not retrained) and resumed from a checkpoint into exactly
the uninterrupted result; the shared QUICK model (one training run per cache) learned something."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import tiny_lm

# one layer of width 32: compiles and trains in a second or two (the cache and resume mechanics)
MICRO = dataclasses.replace(tiny_lm.QUICK, vocab_size=300, hidden_size=32, intermediate_size=48, num_layers=1,
                            num_heads=2, num_kv_heads=1, seq_len=32, batch_size=4, steps=3, warmup_steps=1)


def test_perplexity_matches_float64_reference():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(7, 7)) * 2.0  # logits of the next token given the current one (a bigram model)
    tokens = rng.integers(0, 7, size=(5, 9)).astype(np.int32)
    apply = lambda params, ids: params[ids]
    logp = table - np.log(np.sum(np.exp(table), axis=1, keepdims=True))
    want = math.exp(-np.mean(logp[tokens[:, :-1], tokens[:, 1:]]))
    got = tiny_lm.perplexity(apply, jnp.asarray(table, jnp.float32), tokens, batch_size=2)  # a ragged last batch
    assert got == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError):
        tiny_lm.perplexity(apply, jnp.asarray(table), tokens[:, :1])
    with pytest.raises(ValueError):
        tiny_lm.perplexity(apply, jnp.asarray(table), tokens.astype(np.float32))


@pytest.mark.parametrize("corpus", ["lee", "lee+wiki"])
def test_splits_are_disjoint_documents(corpus):
    splits = tiny_lm.split_documents(corpus)
    assert set(splits) == {"train", "tune", "eval"} and all(splits.values())
    seen: dict[str, str] = {}
    for name, documents in splits.items():
        for doc in documents:
            assert seen.setdefault(doc, name) == name, f"a document is in both {seen[doc]} and {name}"
    lee = tiny_lm._documents(tiny_lm.corpus_files(corpus)["lee"])
    assert splits["eval"][: len(lee)] == lee  # lee.cor is held out whole
    if corpus == "lee+wiki":
        wiki = tiny_lm._documents(tiny_lm.corpus_files(corpus)["wiki"])
        assert sum(doc in wiki for docs in splits.values() for doc in docs) == len(wiki) == 250  # every article used once
    with pytest.raises(ValueError):
        tiny_lm.corpus_files("wiki")  # type: ignore[arg-type]


def test_micro_trains_caches_reloads_and_resumes(tmp_path):
    whole = tiny_lm.load_or_train_tiny_lm(train=MICRO, cache_root=tmp_path / "whole")
    folder = tiny_lm.cache_dir_for(MICRO, tmp_path / "whole")
    assert (folder / "done").is_file() and not list((tmp_path / "whole").glob(".staging-*"))
    assert whole.config == MICRO.model_config()
    assert whole.eval_tokens.dtype == np.int32 and whole.eval_tokens.shape[1] == MICRO.seq_len
    eval_text = "".join(tiny_lm.split_documents("lee")["eval"])
    assert whole.tokenizer.decode([int(t) for t in whole.eval_tokens[0, 1:30]]) in eval_text
    assert whole.tokenizer.decode(whole.tokenizer.encode("The bushfire spread.").ids) == "The bushfire spread."
    tune = tiny_lm.tune_tokens(train=MICRO, cache_root=tmp_path / "whole")
    tune_text = "".join(tiny_lm.split_documents("lee")["tune"])
    assert tune.dtype == np.int32 and whole.tokenizer.decode([int(t) for t in tune[1:30]]) in tune_text
    stamp = (folder / "params.npz").stat().st_mtime_ns
    again = tiny_lm.load_or_train_tiny_lm(train=MICRO, cache_root=tmp_path / "whole")
    assert (folder / "params.npz").stat().st_mtime_ns == stamp  # loaded, not retrained
    jax.tree.map(np.testing.assert_array_equal, again.params, whole.params)

    # the same run in chunks of one step: each call pauses with a checkpoint, the last one finishes
    root = tmp_path / "chunks"
    for step in range(1, MICRO.steps):
        with pytest.raises(tiny_lm.TrainingPaused) as paused:
            tiny_lm.load_or_train_tiny_lm(train=MICRO, cache_root=root, max_train_seconds=0.0)
        assert paused.value.step == step and paused.value.steps == MICRO.steps
    chunked = tiny_lm.load_or_train_tiny_lm(train=MICRO, cache_root=root, max_train_seconds=0.0)
    jax.tree.map(np.testing.assert_array_equal, chunked.params, whole.params)  # bit for bit
    assert sorted(p.name for p in root.iterdir()) == [folder.name]  # no checkpoint or staging left behind


def test_quick_model_is_shared_and_learned_something(capsys):
    """The QUICK model through the default cache (trained once, then shared by every quick test)."""
    config, params, tokenizer, eval_tokens = tiny_lm.load_or_train_tiny_lm(quick=True)
    assert config == tiny_lm.QUICK.model_config() and config.hidden_size % 64  # ragged at g64
    ppl = tiny_lm.perplexity(tiny_lm.make_apply(config), params, eval_tokens[:8])
    assert 1.0 < ppl < 0.5 * config.vocab_size  # well below a uniform guess
    batches = tiny_lm.calibration_batches(count=12, batch_size=8, quick=True)
    assert [b.shape for b in batches] == [(8, 64), (4, 64)]
    assert tiny_lm.main(["--quick"]) == 0
    assert "loaded" in capsys.readouterr().out


def test_cache_key_depends_on_the_config(tmp_path):
    other = dataclasses.replace(tiny_lm.QUICK, steps=41)
    assert tiny_lm.cache_dir_for(other, tmp_path) != tiny_lm.cache_dir_for(tiny_lm.QUICK, tmp_path)
    assert tiny_lm.cache_dir_for(tiny_lm.QUICK, tmp_path) == tiny_lm.cache_dir_for(tiny_lm.QUICK, tmp_path)
    assert tiny_lm.cache_dir_for(tiny_lm.FULL, tmp_path) != tiny_lm.cache_dir_for(
        dataclasses.replace(tiny_lm.FULL, corpus="lee"), tmp_path)


def test_concurrent_processes_train_once_and_share_the_cache(tmp_path):
    """Two processes asking for the same uncached model at once (as parallel test workers do):
    one trains, the other waits on the cache root's lock and loads the same params."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = (f"import dataclasses, sys; sys.path.insert(0, {str(root)!r}); from examples import tiny_lm; "
            f"micro = tiny_lm.TrainConfig(**{dataclasses.asdict(MICRO)!r}); "
            f"lm = tiny_lm.load_or_train_tiny_lm(train=micro, cache_root={str(tmp_path)!r}, verbose=True); "
            "import numpy as np, jax; print('SUM', float(sum(np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(lm.params))))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert sum(out.count("training ") for out, _ in outs) == 1  # trained once
    sums = {line for out, _ in outs for line in out.splitlines() if line.startswith("SUM")}
    assert len(sums) == 1  # both got the same params
    folder = tiny_lm.cache_dir_for(MICRO, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no partial, staging or lock file left
