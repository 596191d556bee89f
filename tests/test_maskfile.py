"""The mask file: round trip, identity, and refusal of every kind of damaged file."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tiny_lm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppn_bayes.core.architecture import describe
from ppn_bayes.io import FileFormatError
from ppn_bayes.deploy.identity import model_identity
from ppn_bayes.deploy.maskfile import load_masks, save_masks
from ppn_bayes.core.ranking import Ranking

torch.set_num_threads(1)

SIZES = (0.9, 0.6, 0.45, 0.3)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama", seed=0)


@pytest.fixture(scope="module")
def ranking(lm):
    arch = describe(lm, mlp_group=32)
    generator = torch.Generator().manual_seed(0)
    return Ranking.from_log_lambda(arch, torch.randn(arch.n_layers, generator=generator),
                                   torch.randn(arch.n_layers, arch.n_units, generator=generator))


@pytest.fixture(scope="module")
def mask_bytes(lm, ranking, tmp_path_factory):
    path = tmp_path_factory.mktemp("masks") / "masks.json"
    save_masks(path, ranking, sizes=SIZES, n_params=[ranking.total_params // 5], lm=lm)
    return path.read_bytes()


def _write(tmp_path, data) -> str:
    path = tmp_path / "edited.json"
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return path


def test_round_trip(lm, ranking, tmp_path, mask_bytes):
    path = _write(tmp_path, mask_bytes)
    loaded = load_masks(path, lm)
    assert torch.equal(loaded.ranking.items, ranking.items)
    assert loaded.arch == ranking.arch
    budgets = sorted([int(s * ranking.total_params) for s in SIZES] + [ranking.total_params // 5])
    assert [m.kept_params for m in loaded.masks] == [ranking.masks_for_params(b).kept_params for b in budgets]
    for small, large in zip(loaded.masks, loaded.masks[1:]):
        assert small <= large
    for size in SIZES:
        got, expected = loaded.masks_for(size), ranking.masks(size)
        assert torch.equal(got.layer, expected.layer) and torch.equal(got.unit, expected.unit)
    data = json.loads(mask_bytes)
    assert data["base_model"] == model_identity(lm)
    assert set(data["units"]) == {"axis", "attention", "mlp", "layer"}


def test_a_file_for_another_model_is_refused(tmp_path, mask_bytes):
    path = _write(tmp_path, mask_bytes)
    with pytest.raises(FileFormatError, match="another model"):
        load_masks(path, tiny_lm("llama", num_hidden_layers=4))
    with pytest.raises(FileFormatError, match="another model"):  # same units, other vocabulary
        load_masks(path, tiny_lm("llama", vocab_size=101))
    with pytest.raises(FileFormatError, match="another model"):
        load_masks(path, tiny_lm("qwen2"))


def test_other_weights_only_warn(tmp_path, mask_bytes):
    path = _write(tmp_path, mask_bytes)
    with pytest.warns(UserWarning, match="other weights"):
        load_masks(path, tiny_lm("llama", seed=9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_masks(path, tiny_lm("llama", seed=0))


def test_version_truncation_and_garbage(tmp_path, mask_bytes):
    data = json.loads(mask_bytes)
    with pytest.raises(FileFormatError, match="version 2"):
        load_masks(_write(tmp_path, {**data, "format_version": 2}))
    with pytest.raises(FileFormatError, match="not a ppn_bayes mask file"):
        load_masks(_write(tmp_path, {**data, "format": "something else"}))
    with pytest.raises(FileFormatError, match="not valid JSON"):
        load_masks(_write(tmp_path, mask_bytes[: len(mask_bytes) // 2]))
    with pytest.raises(FileFormatError, match="no file"):
        load_masks(tmp_path / "absent.json")


def _costs(arch):
    return arch.costs(dtype=torch.int64)


def test_hand_edits_into_an_inconsistent_hierarchy_are_refused(tmp_path, mask_bytes, ranking):
    data = json.loads(mask_bytes)
    arch = ranking.arch
    entry = data["masks"][0]
    # A unit kept in a dropped layer.
    dropped = entry["layer"].index(0)
    edited = json.loads(mask_bytes)
    edited["masks"][0]["unit"][dropped][0] = 1
    with pytest.raises(FileFormatError, match="dropped layer"):
        load_masks(_write(tmp_path, edited))
    # Over budget: add a unit of a kept layer that does not fit, with an honest kept_params.
    layer_cost, unit_cost = _costs(arch)
    slack = entry["budget"] - entry["kept_params"]
    l, u = next((l, u) for l in range(arch.n_layers) for u in range(arch.n_units)
                if entry["layer"][l] and not entry["unit"][l][u] and unit_cost[l, u] > slack)
    edited = json.loads(mask_bytes)
    edited["masks"][0]["unit"][l][u] = 1
    edited["masks"][0]["kept_params"] = entry["kept_params"] + int(unit_cost[l, u])
    with pytest.raises(FileFormatError, match="over its budget"):
        load_masks(_write(tmp_path, edited))
    # Not nested: the second mask drops a unit the first keeps, for one that fits its budget.
    small, large = data["masks"][0], data["masks"][1]
    slack = large["budget"] - large["kept_params"]
    swap = next(((l, x, y) for l in range(arch.n_layers) if small["layer"][l]
                 for x in range(arch.n_units) if small["unit"][l][x]
                 for y in range(arch.n_units)
                 if not large["unit"][l][y] and unit_cost[l, y] <= unit_cost[l, x] + slack), None)
    assert swap is not None
    l, x, y = swap
    edited = json.loads(mask_bytes)
    edited["masks"][1]["unit"][l][x], edited["masks"][1]["unit"][l][y] = 0, 1
    edited["masks"][1]["kept_params"] += int(unit_cost[l, y] - unit_cost[l, x])
    with pytest.raises(FileFormatError, match="not nested"):
        load_masks(_write(tmp_path, edited))
    # Within budget and nested, but not the ranking's prefix: drop the last kept item.
    edited = json.loads(mask_bytes)
    last_l, last_u = ranking.items[ranking.prefix_length(entry["budget"]) - 1].tolist()
    assert last_u >= 0
    edited["masks"][0]["unit"][last_l][last_u] = 0
    edited["masks"][0]["kept_params"] -= int(unit_cost[last_l, last_u])
    with pytest.raises(FileFormatError, match="longest prefix"):
        load_masks(_write(tmp_path, edited))
    # A ranking with a unit before its own layer.
    edited = json.loads(mask_bytes)
    items = edited["ranking"]["items"]
    first_unit = next(i for i, (_, u) in enumerate(items) if u >= 0)
    layer_at = items.index([items[first_unit][0], -1])
    for key in ("items", "cost"):
        row = edited["ranking"][key]
        row[first_unit], row[layer_at] = row[layer_at], row[first_unit]
    with pytest.raises(FileFormatError, match="before its layer"):
        load_masks(_write(tmp_path, edited))
    # Costs that differ from the architecture.
    edited = json.loads(mask_bytes)
    edited["architecture"]["unit_cost"][0][0] += 1
    with pytest.raises(FileFormatError):
        load_masks(_write(tmp_path, edited))


def test_save_refuses_bad_requests(tmp_path, lm, ranking):
    path = tmp_path / "m.json"
    save_masks(path, ranking, sizes=[0.5], lm=lm)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_masks(path, ranking, sizes=[0.5], lm=lm)
    save_masks(path, ranking, sizes=[0.4], lm=lm, overwrite=True)
    for size in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="size"):
            save_masks(tmp_path / "x.json", ranking, sizes=[size], lm=lm)
    with pytest.raises(ValueError, match="smallest sub-network"):
        save_masks(tmp_path / "x.json", ranking, n_params=[int(ranking.cost[0]) - 1], lm=lm)
    with pytest.raises(ValueError, match="another model"):
        save_masks(tmp_path / "x.json", ranking, sizes=[0.5], lm=tiny_lm("llama", num_hidden_layers=4))
    assert not (tmp_path / "x.json").exists()


# -- property: mangled files give a clear error or the very same masks ------------------------
def _assert_clear_error_or_same(path, lm, ranking):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = load_masks(path, lm)
    except (FileFormatError, ValueError) as err:
        assert str(err).strip()
        return
    assert torch.equal(loaded.ranking.items, ranking.items)
    assert torch.equal(loaded.ranking.cost, ranking.cost)
    assert loaded.arch == ranking.arch
    for masks in loaded.masks:  # every mask that loads is the one the true ranking gives
        budget_masks = ranking.masks_for_params(masks.kept_params)
        assert torch.equal(masks.layer, budget_masks.layer) and torch.equal(masks.unit, budget_masks.unit)


_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_files(tmp_path, lm, ranking, mask_bytes, cut):
    path = _write(tmp_path, mask_bytes[: int(cut * len(mask_bytes))])
    with pytest.raises(FileFormatError):
        load_masks(path, lm)


@_SETTINGS
@given(position=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255))
def test_flipped_bytes(tmp_path, lm, ranking, mask_bytes, position, flip):
    data = bytearray(mask_bytes)
    index = int(position * len(data))
    data[index] ^= flip
    _assert_clear_error_or_same(_write(tmp_path, bytes(data)), lm, ranking)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, prefix + (index,))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=6,
)


@_SETTINGS
@given(which=st.floats(0, 1, exclude_max=True), value=_JSON, nudge=st.integers(-3, 3))
def test_edited_fields(tmp_path, lm, ranking, mask_bytes, which, value, nudge):
    data = json.loads(mask_bytes)
    paths = [p for p in _paths(data) if p]
    path = paths[int(which * len(paths))]
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    old = parent[path[-1]]
    # Half the time a plausible edit (a number nudged), else any JSON value.
    if nudge and _is_number(old):
        parent[path[-1]] = old + nudge
    else:
        parent[path[-1]] = value
    _assert_clear_error_or_same(_write(tmp_path, json.dumps(data).encode()), lm, ranking)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
