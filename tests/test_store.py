"""Token stores (sharded, memory-mapped, resumable) and the fit's data mixture."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppn_bayes.data import CharTokenizer, TokenBlocks, save_tokens
from ppn_bayes.io import FileFormatError
from ppn_bayes.store import (
    Mixture, TokenSource, TokenStore, TokenStoreWriter, check_same_data, open_mixture, open_source,
    parse_sources, read_manifest, same_tokenizer, tokenizer_identity, write_store,
)

TOKENIZER = tokenizer_identity(CharTokenizer("abcdefghij"))
STREAM = torch.randint(0, 97, (1000,), generator=torch.Generator().manual_seed(0))


class Killed(Exception):
    """The process dies here (a simulated kill)."""


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _write(folder: Path, pieces: list[torch.Tensor], shard_tokens: int, *, first: int = 0, resume: bool = False):
    """Append ``pieces[first:]`` (the marker counts the pieces appended) and close."""
    writer = TokenStoreWriter(folder, vocab_size=97, tokenizer=TOKENIZER, source={"what": "test"},
                              shard_tokens=shard_tokens, resume=resume)
    for i in range(first, len(pieces)):
        writer.append(pieces[i], marker={"pieces": i + 1}, stats={"pieces": i + 1})
    writer.close()
    return writer


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12), shard_tokens=st.integers(1, 90),
       kill_at=st.integers(0, 12), between=st.one_of(st.none(), st.integers(0, 4)), stray=st.booleans())
def test_a_store_written_in_shards_and_resumed_equals_one_written_at_once(lengths, shard_tokens, kill_at, between,
                                                                         stray):
    """A kill after ``kill_at`` pieces, or (``between`` given) after shard ``between`` is renamed
    into place but before the manifest lists it; a stray temporary of the killed write; then a
    resume: the same files as a store written at once."""
    cuts = np.cumsum([0] + lengths)
    pieces = [STREAM[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    with tempfile.TemporaryDirectory() as tmp:
        once, resumed = Path(tmp, "once"), Path(tmp, "resumed")
        _write(once, pieces, shard_tokens)

        writer = TokenStoreWriter(resumed, vocab_size=97, tokenizer=TOKENIZER, source={"what": "test"},
                                  shard_tokens=shard_tokens)
        calls = {"n": 0}
        real = TokenStoreWriter._write_manifest

        def manifest_then_kill(self):
            if calls["n"] == between:  # the shard is on disk, its manifest update never happens
                raise Killed
            calls["n"] += 1
            real(self)

        with mock.patch.object(TokenStoreWriter, "_write_manifest", manifest_then_kill):
            try:
                for i in range(len(pieces) if between is not None else min(kill_at, len(pieces))):
                    writer.append(pieces[i], marker={"pieces": i + 1}, stats={"pieces": i + 1})
            except Killed:
                pass
        if stray and resumed.exists():
            Path(resumed, ".shard-00007.safetensors.k1ll3d.tmp").write_bytes(b"half a shard")
        again = TokenStoreWriter(resumed, vocab_size=97, tokenizer=TOKENIZER, source={"what": "test"},
                                 shard_tokens=shard_tokens, resume=True)
        first = again.marker["pieces"] if again.marker else 0
        assert again.tokens == int(cuts[first])  # continues right after its last whole shard
        _write(resumed, pieces, shard_tokens, first=first, resume=True)
        assert _files(resumed) == _files(once)
        assert torch.equal(TokenStore(resumed).tokens(), STREAM[:cuts[-1]])


def test_a_store_reads_back_memory_mapped_and_windows_span_shards(tmp_path):
    store = write_store(tmp_path / "s", STREAM, vocab_size=97, tokenizer=TOKENIZER, shard_tokens=300)
    manifest = read_manifest(tmp_path / "s")
    assert manifest["dtype"] == "uint16" and manifest["complete"] and manifest["total_tokens"] == 1000
    assert [s["tokens"] for s in manifest["shards"]] == [300, 300, 300, 100]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors",
        "shard-00003.safetensors"]
    from safetensors.numpy import load_file

    assert load_file(tmp_path / "s" / "shard-00001.safetensors")["tokens"].dtype == np.uint16
    assert store.numel() == 1000 and torch.equal(store.tokens(), STREAM)
    for start, length in [(0, 1000), (290, 20), (299, 302), (600, 300), (999, 1), (5, 0)]:
        window = store.window(start, length)
        assert window.dtype == torch.long and torch.equal(window, STREAM[start:start + length])
    starts = torch.tensor([0, 295, 598, 990])
    assert torch.equal(store.rows(starts, 10), STREAM[starts[:, None] + torch.arange(10)])
    with pytest.raises(IndexError, match="outside the 1000 tokens"):
        store.window(995, 6)
    wide = write_store(tmp_path / "w", torch.tensor([0, 69_999, 65_536]), vocab_size=70_000, tokenizer=TOKENIZER)
    assert wide.manifest["dtype"] == "int32" and wide.tokens().tolist() == [0, 69_999, 65_536]


def _corrupt(folder: Path, how: str) -> str:
    shard = folder / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    if how == "missing":
        shard.unlink()
        return "shard-00001.safetensors: the file is missing"
    if how == "corrupt":
        data[-3] ^= 0xFF
        shard.write_bytes(bytes(data))
        return "shard-00001.safetensors: its SHA-256 differs"
    if how == "truncated":
        shard.write_bytes(bytes(data[:-10]))
        return "shard-00001.safetensors: .* bytes, the manifest says"
    manifest = json.loads((folder / "manifest.json").read_text())
    if how == "count":  # a manifest edited to another token count: the header disagrees
        manifest["shards"][1]["tokens"] += 1
        manifest["total_tokens"] += 1
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return "shard-00001.safetensors: .* holds 300 tokens, the manifest says 301"
    if how == "dtype":
        manifest["dtype"] = "int32"
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return "dtype int32 does not suit a vocabulary of 97"
    if how == "version":
        manifest["format_version"] = 2
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return "format_version 2"
    (folder / "manifest.json").write_text("{not json")
    return "not valid JSON"


@pytest.mark.parametrize("how", ["missing", "corrupt", "truncated", "count", "dtype", "version", "json"])
def test_a_damaged_store_is_refused_naming_the_shard_and_the_problem(tmp_path, how):
    write_store(tmp_path / "s", STREAM, vocab_size=97, tokenizer=TOKENIZER, shard_tokens=300)
    message = _corrupt(tmp_path / "s", how)
    with pytest.raises(FileFormatError, match=message):
        TokenStore(tmp_path / "s")
    with pytest.raises(FileFormatError, match=message):
        open_source(tmp_path / "s")
    if how == "corrupt":  # the hashing is what finds a flipped byte
        assert torch.equal(TokenStore(tmp_path / "s", verify=False).window(0, 300), STREAM[:300])


def test_an_incomplete_store_is_refused_until_its_writer_finishes(tmp_path):
    writer = TokenStoreWriter(tmp_path / "s", vocab_size=97, tokenizer=TOKENIZER, source={}, shard_tokens=10)
    writer.append(STREAM[:25], marker=1)
    with pytest.raises(FileFormatError, match="incomplete .*25 tokens in 1 shards.*resume"):
        TokenStore(tmp_path / "s")
    assert TokenStore(tmp_path / "s", allow_incomplete=True).numel() == 25
    writer.close()
    assert TokenStore(tmp_path / "s").numel() == 25


def test_the_writer_refuses_other_settings_and_existing_folders_and_writes_nothing_for_bad_ids(tmp_path):
    folder = tmp_path / "s"
    writer = TokenStoreWriter(folder, vocab_size=97, tokenizer=TOKENIZER, source={"settings": {"t": 0.8}},
                              shard_tokens=10)
    with pytest.raises(ValueError, match="token ids outside the LM's vocabulary of 97"):
        writer.append(torch.tensor([1, 97]))
    assert not folder.exists()  # nothing is written before the first shard
    writer.append(STREAM[:12], stats={"n": 1})
    other = CharTokenizer("xyz")
    refusals = [
        (dict(source={"settings": {"t": 0.9}}), r"source\.settings\.t: stored 0\.8, given 0\.9"),
        (dict(tokenizer=tokenizer_identity(other)), "tokenizer: stored .*, given CharTokenizer sha256:"),
        (dict(shard_tokens=11), "shard_tokens: stored 10, given 11"),
        (dict(vocab_size=70_000), "dtype: stored 'uint16', given 'int32'"),
    ]
    for change, message in refusals:
        options = dict(vocab_size=97, tokenizer=TOKENIZER, source={"settings": {"t": 0.8}}, shard_tokens=10) | change
        with pytest.raises(ValueError, match=message):
            TokenStoreWriter(folder, resume=True, **options)
    same = TokenStoreWriter(folder, vocab_size=97, tokenizer=TOKENIZER, source={"settings": {"t": 0.8}, "stats": 5},
                            shard_tokens=10, resume=True)  # stats may differ: they grow with the store
    assert same.tokens == 12 and same.stats == {"n": 1}
    with pytest.raises(FileExistsError, match="pass resume=True"):
        TokenStoreWriter(folder, vocab_size=97, tokenizer=TOKENIZER, source={})
    (tmp_path / "killed").mkdir()  # a write killed before its first manifest left a shard
    (tmp_path / "killed" / "shard-00000.safetensors").write_bytes(b"whole or not")
    with pytest.raises(FileExistsError, match="killed before its first manifest; pass resume=True"):
        TokenStoreWriter(tmp_path / "killed", vocab_size=97, tokenizer=TOKENIZER, source={})
    _write(tmp_path / "killed", [STREAM[:3]], 10, resume=True)
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["manifest.json", "shard-00000.safetensors"]
    assert TokenStore(tmp_path / "killed").tokens().tolist() == STREAM[:3].tolist()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="without a token store's manifest"):
        TokenStoreWriter(tmp_path / "other", vocab_size=97, tokenizer=TOKENIZER, source={}, overwrite=True)
    # overwrite: the old store stays whole until the first shard of the new one
    replacing = TokenStoreWriter(folder, vocab_size=97, tokenizer=TOKENIZER, source={}, shard_tokens=4,
                                 overwrite=True)
    assert read_manifest(folder)["total_tokens"] == 12
    replacing.append(STREAM[:5])
    replacing.close()
    assert torch.equal(TokenStore(folder).tokens(), STREAM[:5])


def test_tokenizer_identity_is_the_vocabulary_not_the_folder():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    def hf(vocab, name):
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")))
        tokenizer.name_or_path = name
        return tokenizer

    a = tokenizer_identity(hf({"<unk>": 0, "a": 1, "b": 2}, "/models/one"))
    moved = tokenizer_identity(hf({"<unk>": 0, "a": 1, "b": 2}, "/elsewhere/one"))
    other = tokenizer_identity(hf({"<unk>": 0, "b": 1, "a": 2}, "/models/one"))
    assert a.startswith("/models/one sha256:") and a != moved and same_tokenizer(a, moved)
    assert not same_tokenizer(a, other)
    chars = tokenizer_identity(CharTokenizer("abc"))
    assert chars == tokenizer_identity(CharTokenizer("abc")) and not same_tokenizer(chars, tokenizer_identity(
        CharTokenizer("abd")))
    with pytest.raises(TypeError, match="cannot identify"):
        tokenizer_identity(object())


def test_open_source_reads_text_token_files_and_stores_and_checks_tokenizer_and_ids(tmp_path):
    tokenizer = CharTokenizer("abcdefghij")
    (tmp_path / "a.txt").write_text("abcabcjjja" * 10)
    text = open_source(tmp_path / "a.txt", tokenizer)
    assert text.numel() == 100 and text.window(0, 4).tolist() == [0, 1, 2, 0]
    assert text.identity()["kind"] == "text" and text.identity()["tokenizer"] == TOKENIZER
    save_tokens(tmp_path / "t.safetensors", STREAM)
    tokens = open_source(tmp_path / "t.safetensors")
    assert torch.equal(tokens.tokens(), STREAM) and tokens.identity()["kind"] == "tokens"
    write_store(tmp_path / "s", STREAM % 10, vocab_size=10, tokenizer=TOKENIZER, shard_tokens=64)
    assert open_source(tmp_path / "s", tokenizer, vocab_size=10).identity()["kind"] == "store"
    with pytest.raises(FileFormatError, match="written with tokenizer CharTokenizer sha256:.*the LM's tokenizer is"):
        open_source(tmp_path / "s", CharTokenizer("0123456789"))
    with pytest.raises(ValueError, match=r"t\.safetensors: token ids outside the LM's vocabulary of 50"):
        open_source(tmp_path / "t.safetensors", vocab_size=50)
    with pytest.raises(ValueError, match="a tokenizer is needed"):
        open_source(tmp_path / "a.txt")
    with pytest.raises(FileNotFoundError, match="no data file or token store"):
        open_source(tmp_path / "nothing.txt", tokenizer)
    save_tokens(tmp_path / "two.safetensors", STREAM)  # a file holding a second tensor is refused
    from safetensors.numpy import save_file

    save_file({"tokens": np.arange(4), "other": np.arange(2)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(FileFormatError, match=r"exactly one tensor named 'tokens', holds \['other', 'tokens'\]"):
        open_source(tmp_path / "two.safetensors")


def test_a_single_source_mixture_is_token_blocks(tmp_path):
    """Old fits reproduce: one source of weight 1 gives TokenBlocks' rows, whatever holds the
    tokens (a tensor, or a store whose windows span shards), on every rank."""
    store = write_store(tmp_path / "s", STREAM, vocab_size=97, tokenizer=TOKENIZER, shard_tokens=70)
    blocks = TokenBlocks(STREAM, seq_len=32, seed=3)
    for source in (STREAM, store):
        mixture = Mixture([source], [1.0], seq_len=32, seed=3)
        for step in (0, 1, 17):
            for rank in range(3):
                assert torch.equal(mixture.batch(step, 4, rank=rank, world_size=3),
                                   blocks.batch(step, 4, rank=rank, world_size=3))


def test_ranks_read_their_rows_of_one_global_batch():
    mixture = Mixture([STREAM, STREAM[:100] + 100, STREAM[:50] + 200], [0.5, 0.3, 0.2], seq_len=8, seed=1)
    whole = mixture.batch(5, 12)
    assert torch.equal(torch.cat([mixture.batch(5, 4, rank=r, world_size=3) for r in range(3)]), whole)
    assert torch.equal(mixture.batch(5, 12), whole) and not torch.equal(mixture.batch(6, 12), whole)
    assert torch.equal(whole[:, 0] // 100, mixture.sources_drawn(5, 12))  # ids tell the sources apart


def test_mixing_weights_are_honoured_within_sampling_error():
    """Each row picks its source independently, so a source's row count over N rows is
    Binomial(N, p). We allow 5 standard deviations, sqrt(N p (1 - p)): a true Binomial strays
    further with probability below 1e-6 (normal tail; Bernstein's inequality gives below 2e-5),
    so a failure means the weights are not honoured. The seed is fixed, so the test is
    deterministic; the bound is what makes the seed not matter. A zero weight is never drawn."""
    sources = [STREAM % 10, STREAM % 10 + 10, STREAM % 10 + 20, STREAM % 10 + 30]
    weights = [2.0, 5.0, 3.0, 0.0]
    mixture = Mixture(sources, weights, seq_len=16, seed=7)
    rows = torch.cat([mixture.batch(step, 32) for step in range(200)])  # [6400, 16]
    assert (rows // 10 == rows[:, :1] // 10).all()  # every row from one source
    counts = torch.bincount(rows[:, 0] // 10, minlength=4).tolist()
    n = rows.shape[0]
    for count, weight in zip(counts, weights):
        p = weight / sum(weights)
        assert abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (counts, weights)
    assert counts[3] == 0


def test_parse_sources_reads_path_and_weight():
    assert parse_sources(["a.txt:0.5", "gen/:0.5"]) == (["a.txt", "gen/"], [0.5, 0.5])
    assert parse_sources(["a.txt", "gen/"]) == (["a.txt", "gen/"], None)
    assert parse_sources([r"C:\data\a.txt", "gen:v2/"]) == ([r"C:\data\a.txt", "gen:v2/"], None)
    assert parse_sources(["run:3:1", "b:1e-1"]) == (["run:3", "b"], [1.0, 0.1])
    paths, weights = parse_sources(["a:nan"])
    assert paths == ["a"] and math.isnan(weights[0])
    with pytest.raises(ValueError, match="gives a weight but names no source"):
        parse_sources(["a.txt:1", ":0.5"])
    with pytest.raises(ValueError, match=r"to every data source or to none; without one: \['b'\]"):
        parse_sources(["a:1", "b"])


@pytest.mark.parametrize("weights, message", [
    ([1.0, -0.5], r"weight of a tensor of 1000 tokens must be a finite number >= 0, got -0\.5"),
    ([float("nan"), 1.0], "must be a finite number >= 0, got nan"),
    ([0.0, 0.0], "sum to 0.0"),
    ([0.5, 0.3, 0.2], r"weight 3 \(0\.2\) names no source"),
    ([1.0], "source 2 .* has no weight"),
])
def test_bad_mixing_weights_are_named(weights, message):
    with pytest.raises(ValueError, match=message):
        Mixture([STREAM, STREAM], weights, seq_len=16)


def test_sources_of_different_tokenizers_do_not_mix(tmp_path):
    write_store(tmp_path / "s", STREAM, vocab_size=97, tokenizer=TOKENIZER)
    other = TokenSource.from_tensor(STREAM, tokenizer=tokenizer_identity(CharTokenizer("xyz")))
    with pytest.raises(ValueError, match="tokenised with CharTokenizer sha256:.*must share one tokenizer"):
        Mixture([TokenStore(tmp_path / "s"), STREAM, other], seq_len=16)
    Mixture([TokenStore(tmp_path / "s"), STREAM, TokenSource.from_tensor(STREAM, tokenizer=TOKENIZER)], seq_len=16)


def test_open_mixture_refuses_bad_input_before_reading_sources(tmp_path):
    tokenizer = CharTokenizer("abcdefghij")
    (tmp_path / "a.txt").write_text("abcdefghij" * 5)
    write_store(tmp_path / "s", STREAM % 10, vocab_size=10, tokenizer=TOKENIZER, shard_tokens=300)
    mixture = open_mixture([f"{tmp_path / 'a.txt'}:1", f"{tmp_path / 's'}:3"], tokenizer, seq_len=16,
                           vocab_size=10)
    assert mixture.weights == [0.25, 0.75] and mixture.numel() == 1050
    with pytest.raises(ValueError, match="a.txt has 50 tokens, fewer than one window of 64"):
        open_mixture([str(tmp_path / "a.txt"), str(tmp_path / "s")], tokenizer, seq_len=64)
    with pytest.raises(ValueError, match="must be a finite number >= 0, got -1"):
        open_mixture([f"{tmp_path / 'missing'}:-1"], tokenizer, seq_len=16)  # the weight before the path
    with pytest.raises(FileNotFoundError, match="missing"):
        open_mixture([f"{tmp_path / 'missing'}:1"], tokenizer, seq_len=16)
    with pytest.raises(ValueError, match="outside the LM's vocabulary of 5"):
        open_mixture([str(tmp_path / "s")], tokenizer, seq_len=16, vocab_size=5)
    with pytest.raises(FileFormatError, match="written with tokenizer"):
        open_mixture([str(tmp_path / "s")], CharTokenizer("0123456789"), seq_len=16)


def test_a_resume_with_other_data_is_refused(tmp_path):
    write_store(tmp_path / "s", STREAM, vocab_size=97, tokenizer=TOKENIZER, shard_tokens=300)
    recorded = Mixture([TokenStore(tmp_path / "s"), STREAM[:500]], [0.5, 0.5], seq_len=16).identity()
    recorded = json.loads(json.dumps(recorded))  # as a checkpoint keeps it
    (tmp_path / "s").rename(tmp_path / "moved")
    check_same_data(recorded, Mixture([TokenStore(tmp_path / "moved"), STREAM[:500]], [1, 1], seq_len=16).identity())
    other = STREAM[:500].clone()
    other[3] += 1
    cases = [
        (Mixture([TokenStore(tmp_path / "moved"), other], [1, 1], seq_len=16), r"source 2\.sha256"),
        (Mixture([TokenStore(tmp_path / "moved"), STREAM[:500]], [1, 3], seq_len=16), r"source 1\.weight: stored 0\.5"),
        (Mixture([STREAM[:500]], seq_len=16), "has 1 sources; the checkpoint was fitted on 2"),
    ]
    for mixture, message in cases:
        with pytest.raises(ValueError, match=message):
            check_same_data(recorded, mixture.identity())
    check_same_data(TokenSource.from_tensor(STREAM).identity(), Mixture([STREAM], seq_len=16).identity())
