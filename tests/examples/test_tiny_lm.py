"""examples/tiny_lm.py: the perplexity helper against a float64 reference, and the quick config
trained, cached, reloaded (not retrained) and run from the command line."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import tiny_lm


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


def test_quick_trains_caches_and_reloads(tmp_path, capsys):
    config, params, tokenizer, eval_tokens = tiny_lm.load_or_train_tiny_lm(quick=True, cache_root=tmp_path)
    folder = tiny_lm.cache_dir_for(tiny_lm.QUICK, tmp_path)
    assert (folder / "done").is_file() and not list(tmp_path.glob(".staging-*"))
    assert config == tiny_lm.QUICK.model_config() and config.hidden_size % 64  # ragged at g64
    assert eval_tokens.dtype == np.int32 and eval_tokens.shape[1] == tiny_lm.QUICK.seq_len
    apply = tiny_lm.make_apply(config)
    ppl = tiny_lm.perplexity(apply, params, eval_tokens[:8])
    assert 1.0 < ppl < 0.5 * config.vocab_size  # learned something: well below a uniform guess
    # the held-out split is lee.cor, not the training text, and the tokenizer round-trips it
    held_out = tiny_lm.corpus_files()[1].read_text(encoding="latin-1")
    assert tokenizer.decode([int(t) for t in eval_tokens[0, 1:30]]) in held_out
    assert tokenizer.decode(tokenizer.encode("The bushfire spread.").ids) == "The bushfire spread."
    stamp = (folder / "params.npz").stat().st_mtime_ns
    again = tiny_lm.load_or_train_tiny_lm(quick=True, cache_root=tmp_path)
    assert (folder / "params.npz").stat().st_mtime_ns == stamp  # loaded, not retrained
    jax.tree.map(np.testing.assert_array_equal, again.params, params)
    batches = tiny_lm.calibration_batches(count=12, batch_size=8, quick=True, cache_root=tmp_path)
    assert [b.shape for b in batches] == [(8, 64), (4, 64)]
    assert tiny_lm.main(["--quick", "--cache-dir", str(tmp_path)]) == 0
    assert "loaded" in capsys.readouterr().out


def test_cache_key_depends_on_the_config(tmp_path):
    import dataclasses

    other = dataclasses.replace(tiny_lm.QUICK, steps=41)
    assert tiny_lm.cache_dir_for(other, tmp_path) != tiny_lm.cache_dir_for(tiny_lm.QUICK, tmp_path)
    assert tiny_lm.cache_dir_for(tiny_lm.QUICK, tmp_path) == tiny_lm.cache_dir_for(tiny_lm.QUICK, tmp_path)
