"""Concept steering and composite features on the demo photos' store, with a tiny model trained
here: alpha 0 is the plain sample, the class-mean direction is the training rows' mean difference,
edits set exactly what they say to the normalised zero, and bad values fail in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from pipeline.config import ConfigError, validate_config
from sampling.analyses import (
    MIN_CELL,
    ChannelNorm,
    channel_mask,
    class_means,
    composite_run,
    mixed,
    open_analysis,
    region_mask,
    removed,
    steer_run,
    steering_direction,
    top_channels,
)
from tests.test_training import FEATURES, TINY, training_config

STEPS = {"steps": 4, "guidance": 1.0, "limit": 2}  # few sampling steps: mechanics, not beauty


@pytest.fixture(scope="session")
def tiny_model(train_store, tmp_path_factory):
    """A compact model trained for 60 steps on the store: mechanics, not good images."""
    from training.train import train

    out = tmp_path_factory.mktemp("analyses_model")
    return train(training_config(train_store, out, steps=60, **TINY), progress=False)


def analyses_config(store: str, model, out, **analyses) -> dict:
    return validate_config(
        {
            "store": store,
            "sampling": {"model": str(model), "output_dir": str(out)},
            "analyses": {**STEPS, **analyses},
        },
        "sample",
    )


def analysis_of(store: str, model, out, **analyses):
    return open_analysis(analyses_config(store, model, out, **analyses))


def manifest(folder) -> dict:
    found = json.loads((folder / "manifest.json").read_text())
    assert set(found) >= {"kind", "title", "description", "grids"}
    assert all((folder / grid["png"]).is_file() and grid["caption"] for grid in found["grids"])
    return found


def cell(png, row: int, column: int, size: int = 32) -> np.ndarray:
    """One image `[3, H, W]` of a saved grid (make_grid's 2 px padding, enlarged by nearest)."""
    scale = -(-MIN_CELL // size)
    top, left = ((2 + i * (size + 2)) * scale for i in (row, column))
    pixels = np.asarray(Image.open(png))[
        top : top + size * scale : scale, left : left + size * scale : scale
    ]
    return pixels.transpose(2, 0, 1)


def test_steering_at_alpha_zero_is_the_plain_sample(train_store, tiny_model, tmp_path):
    """One seed per row: the alpha 0 column is exactly the model's sample of the stored map, and
    the maps fed to the model move by exactly alpha along the direction.  The samples' re-extracted
    maps are recorded but not asserted on: this 60-step model's 32 px samples barely follow their
    map (measured: a flat projection over alpha -3..3), while the demo model's do (README)."""
    alphas = [-3, 0, 3]
    config = analyses_config(train_store, tiny_model, tmp_path, steering={"alphas": alphas})
    out = steer_run(config, progress=False)
    found = manifest(out)
    assert found["kind"] == "steering" and found["alphas"] == alphas
    analysis = open_analysis(config)
    maps, _ = analysis.read(found["keys"])
    plain = analysis.sample(maps, found["keys"]).numpy()
    png = out / found["grids"][0]["png"]
    for row in range(len(found["keys"])):
        assert np.array_equal(cell(png, row, 1 + alphas.index(0)), plain[row])
        assert not np.array_equal(cell(png, row, 1), plain[row])
    for key in found["effect"]["per_key"]:
        np.testing.assert_allclose(key["fed"], key["stored"] + np.array(alphas), atol=1e-3)
        assert len(key["reextracted"]) == len(alphas)


def test_class_mean_direction_is_the_training_rows_mean_difference(
    train_store, tiny_model, tmp_path
):
    analysis = analysis_of(train_store, tiny_model, tmp_path)
    data = analysis.data
    root = zarr.open_group(train_store, mode="r")
    labels, classes = root["samples/label"][:], list(root["samples"].attrs["classes"])
    stored = root[FEATURES][:][:, data.views].astype(np.float64)
    expected = [
        stored[[r for r in data.train_rows if labels[r] == classes.index(name)]].mean((0, 1))
        for name in ("people", "textures")
    ]
    np.testing.assert_allclose(class_means(data, ["people", "textures"]), expected, rtol=1e-9)

    direction, about = steering_direction(analysis)
    std = ChannelNorm.of(data.channel_stats).std.double().numpy()
    np.testing.assert_allclose(direction, (expected[1] - expected[0]) / std, rtol=1e-5, atol=1e-6)
    assert about["alpha_of_d"] == pytest.approx(np.linalg.norm(direction) / about["typical_norm"])


def test_channel_and_vector_directions(train_store, tiny_model, tmp_path):
    """A channel is one std at every position; a [C] vector is the same at every position."""
    steering = {"direction": "channel", "channel": 5}
    channel, _ = steering_direction(
        analysis_of(train_store, tiny_model, tmp_path, steering=steering)
    )
    assert channel[5].eq(1).all() and channel.sum() == channel[5].sum()
    c, y, x = channel.shape
    vector = np.random.default_rng(0).normal(size=c).astype(np.float32)
    np.save(tmp_path / "v.npy", vector)
    np.save(tmp_path / "map.npy", np.broadcast_to(vector[:, None, None], (c, y, x)))
    made = []
    for name in ("v.npy", "map.npy"):
        steering = {"direction": "vector", "vector": str(tmp_path / name)}
        analysis = analysis_of(train_store, tiny_model, tmp_path, steering=steering)
        made.append(steering_direction(analysis)[0])
    torch.testing.assert_close(made[0], made[1])


def test_composite_edits_set_exactly_their_part_to_the_normalised_zero(
    train_store, tiny_model, tmp_path
):
    analysis = analysis_of(train_store, tiny_model, tmp_path)
    norm = analysis.norm
    maps, _ = analysis.read(analysis.keys())
    c = maps.shape[1]
    nothing = removed(maps, torch.ones(len(maps), c, 1, 1, dtype=torch.bool), norm)
    assert norm.normalize(nothing).eq(0).all()

    top = top_channels(maps, 16, norm)
    z = norm.normalize(maps).mean((2, 3)).numpy()
    for row, channels in enumerate(top.tolist()):
        assert set(channels) == set(np.argsort(-z[row])[:16].tolist())
    kept = removed(maps, ~channel_mask(top, c), norm)
    for row, channels in enumerate(top.tolist()):
        others = sorted(set(range(c)) - set(channels))
        assert torch.equal(kept[row, channels], maps[row, channels])
        assert norm.normalize(kept)[row, others].eq(0).all()

    left = region_mask("left", analysis.grid)
    both = mixed(maps[0:1], maps[1:2], left)[0]
    assert left.any() and (~left).any()
    assert torch.equal(both[:, left], maps[0][:, left])
    assert torch.equal(both[:, ~left], maps[1][:, ~left])
    assert torch.equal(region_mask("right", analysis.grid), ~left)
    assert torch.equal(region_mask("border", analysis.grid), ~region_mask("center", analysis.grid))


def test_composite_run_writes_its_grids(train_store, tiny_model, tmp_path):
    """Two keys: one pair to mix; complementary regions give one column per distinct mask."""
    composite = {"top_k": 4, "regions": ["center", "border"], "mix": ["left"]}
    out = composite_run(
        analyses_config(train_store, tiny_model, tmp_path, composite=composite), progress=False
    )
    found = manifest(out)
    assert found["kind"] == "composite"
    assert [g["png"] for g in found["grids"]] == ["channels.png", "regions.png", "mix.png"]
    assert found["pairs"] == [found["keys"][:2]]
    effect = found["effect"]
    regions = ["only center kept = border removed", "center removed = only border kept"]
    assert effect["regions"]["columns"] == ["full map", *regions]
    assert len(effect["channels"]["top_channels"][found["keys"][0]]) == 4
    assert np.shape(effect["channels"]["cosine_to_fed"]) == (2, 4)  # keys x sampled columns
    scale = -(-MIN_CELL // 32)  # mix: targets of A and B, A, B, left of A, left of B
    assert Image.open(out / "mix.png").width == (2 + 6 * 34) * scale


@pytest.mark.parametrize(
    ("analyses", "named"),
    [
        ({"steering": {"from": "dragons"}}, "'dragons'"),
        ({"steering": {"direction": "channel", "channel": 999}}, "999"),
        ({"steering": {"direction": "vector", "vector": "{tmp}/seven.npy"}}, "[7]"),
        ({"keys": ["people/nobody"]}, "'people/nobody'"),
        ({"view": 5}, "analyses.view: 5"),
        ({"composite": {"pairs": [["animals/chelsea", "nowhere"]]}}, "'nowhere'"),
    ],
)
def test_bad_values_fail_in_one_line(train_store, tiny_model, tmp_path, analyses, named):
    np.save(tmp_path / "seven.npy", np.ones(7, np.float32))
    analyses = json.loads(json.dumps(analyses).replace("{tmp}", str(tmp_path)))
    config = analyses_config(train_store, tiny_model, tmp_path, **analyses)
    run = composite_run if "composite" in analyses else steer_run
    with pytest.raises(ValueError) as error:
        run(config, progress=False)
    assert named in str(error.value) and "\n" not in str(error.value)


def test_unknown_region_is_a_config_error(train_store, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="middle"):
        analyses_config(train_store, tiny_model, tmp_path, composite={"regions": ["middle"]})
