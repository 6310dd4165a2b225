"""The similarity / predict tool over a saved tiny dual encoder."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import paddle
import pytest

from vlretrieval.data.demo import DemoSpec, generate_samples
from vlretrieval.errors import ConfigError, DataError
from vlretrieval.models.prepare import prepare_initial_model
from vlretrieval.models.base import load_model_dir
from vlretrieval.retrieval.similarity import (
    IMAGE_IMAGE,
    IMAGE_TEXT,
    TEXT_TEXT,
    SimilarityModel,
    compute_similarity,
    infer_mode,
    main,
)

from .conftest import BIN, snakemake_env


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("similarity")
    samples = generate_samples(DemoSpec(name="sim", sizes={"test": 3}, seed=11))["test"]
    images = []
    for index, sample in enumerate(samples):
        path = root / f"image_{index}.png"
        path.write_bytes(sample.png)
        images.append(path)
    captions = [sample.captions_zh[0][1] for sample in samples]
    vocab = [caption for sample in samples for _, caption in sample.captions_zh]
    prepare_initial_model("ernie_vil", "tiny", root / "model", vocab_texts=vocab)
    return root / "model", images, captions


def test_image_text_probabilities_follow_the_models_own_logits(demo_files):
    model_dir, images, captions = demo_files
    model = SimilarityModel(model_dir)
    result = compute_similarity(model, images, captions)
    assert result.mode == IMAGE_TEXT
    assert result.image_features.shape == (3, 64) and result.text_features.shape == (3, 64)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-6)

    # Independently: the model's forward logits, softmaxed over the texts of each image.
    family, raw_model, tokenizer, _ = load_model_dir(model_dir)
    transform = family.image_transform(raw_model, train=False)
    from PIL import Image

    pixels = paddle.to_tensor(np.stack([transform(Image.open(path)) for path in images]))
    encoded = family.tokenize(tokenizer, captions, max_len=model.max_len)
    with paddle.no_grad():
        out = raw_model(pixel_values=pixels, input_ids=paddle.to_tensor(encoded["input_ids"]),
                        attention_mask=paddle.to_tensor(encoded["attention_mask"]))
        logits = (out.logit_scale.item() * out.image_features @ out.text_features.T).numpy()
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    assert result.logit_scale == pytest.approx(np.exp(2.6592), rel=1e-4)  # the untrained initial temperature


def test_text_text_and_image_image_are_symmetric_cosines(demo_files):
    model_dir, images, captions = demo_files
    model = SimilarityModel(model_dir)
    texts = compute_similarity(model, texts=captions + [captions[0]])
    assert texts.mode == TEXT_TEXT and texts.probabilities is None
    np.testing.assert_allclose(texts.cosine, texts.cosine.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(texts.cosine), 1.0, atol=1e-5)
    assert texts.cosine[0, 3] == pytest.approx(1.0, abs=1e-5)  # the same text twice
    pictures = compute_similarity(model, images=images)
    assert pictures.mode == IMAGE_IMAGE and pictures.cosine.shape == (3, 3)
    np.testing.assert_allclose(np.diag(pictures.cosine), 1.0, atol=1e-5)
    assert pictures.cosine[0, 1] < 1.0 - 1e-4


def test_mode_is_inferred_or_checked():
    assert infer_mode(2, 3) == IMAGE_TEXT
    assert infer_mode(0, 3) == TEXT_TEXT
    assert infer_mode(2, 0) == IMAGE_IMAGE
    assert infer_mode(2, 3, TEXT_TEXT) == TEXT_TEXT
    with pytest.raises(ConfigError, match="at least one image or one text"):
        infer_mode(0, 0)
    with pytest.raises(ConfigError, match="needs images and texts"):
        infer_mode(0, 2, IMAGE_TEXT)


def test_bad_inputs_name_the_file_or_text(demo_files, tmp_path):
    model_dir, images, captions = demo_files
    model = SimilarityModel(model_dir)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"<html>not an image</html>")
    with pytest.raises(DataError, match="broken.jpg: not a decodable image"):
        compute_similarity(model, [images[0], broken], captions)
    with pytest.raises(DataError, match="missing.png: cannot read image"):
        compute_similarity(model, [tmp_path / "missing.png"], captions)
    with pytest.raises(DataError, match="text #2.*empty text"):
        compute_similarity(model, texts=[captions[0], "  "])
    with pytest.raises(ConfigError, match="not a model directory"):
        SimilarityModel(tmp_path)


def test_cli_prints_json_and_tables(demo_files, tmp_path, capsys):
    model_dir, images, captions = demo_files
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\n".join(captions[1:]) + "\n\n", encoding="utf-8")
    assert main(["--model", str(model_dir), "--image", str(images[0]), "--text", captions[0],
                 "--texts-file", str(texts_file), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["mode"] == IMAGE_TEXT and document["texts"] == captions
    assert document["image_features_shape"] == [1, 64] and document["text_features_shape"] == [3, 64]
    assert len(document["probabilities"][0]) == 3
    assert sum(document["probabilities"][0]) == pytest.approx(1.0, abs=1e-5)

    # The installed console script, with a user error: one line on stderr and exit status 1.
    proc = subprocess.run([str(BIN / "vlretrieval-similarity"), "--model", str(model_dir)],
                          capture_output=True, text=True, env=snakemake_env())
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: give at least one image or one text"
    proc = subprocess.run([str(BIN / "vlretrieval-similarity"), "--model", str(model_dir), "--text", captions[0],
                           "--text", captions[1]], capture_output=True, text=True, env=snakemake_env())
    assert proc.returncode == 0, proc.stderr
    assert "text features: shape [2, 64]" in proc.stdout and "text \\ text cosine" in proc.stdout
