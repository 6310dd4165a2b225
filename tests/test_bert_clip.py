"""BertCLIP (CLIP-Chinese): towers and projections, LiT locking, tower initialisation, BERT export, training."""

from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddlenlp.transformers import BertConfig, BertModel, BertTokenizer, CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from vlretrieval.data.demo import DemoSpec, write_demo_archive
from vlretrieval.data.lmdb_store import serialize_split
from vlretrieval.errors import ConfigError, DownloadError
from vlretrieval.models.base import MODEL_INFO_FILE, read_model_info
from vlretrieval.models.base import CLIP_MEAN, CLIP_STD
from vlretrieval.models.bert_clip import LOGIT_SCALE_INIT, save_text_tower
from vlretrieval.models.prepare import prepare_initial_model, vocab_texts_from_split
from vlretrieval.models.registry import DUAL_ENCODER, get_family, list_families
from vlretrieval.models.vocab import build_vocab_file
from vlretrieval.training.checkpoints import TRAIN_LOG, read_train_log
from vlretrieval.training.hparams import resolve_hparams
from vlretrieval.training.launcher import FinetuneError, launch_finetune
from vlretrieval.training.trainer import apply_freezing, trainable_parameters

paddle.set_device("cpu")

CAPTIONS = [
    "左上角有一个红色的圆形",
    "右下角有一个蓝色的正方形和一个绿色的三角形",
    "中间的黄色菱形",
    "图中共有三个物体：紫色圆形、橙色正方形和红色三角形",
]


@pytest.fixture(scope="module")
def family():
    return get_family("bert_clip")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return prepare_initial_model("bert_clip", "tiny", tmp_path_factory.mktemp("bc") / "tiny", vocab_texts=CAPTIONS, seed=0)


def _inputs(family, tokenizer, n=3, seed=0):
    rng = np.random.default_rng(seed)
    pixels = paddle.to_tensor(rng.standard_normal((n, 3, 64, 64)).astype(np.float32))
    text = family.tokenize(tokenizer, CAPTIONS[:n], max_len=32)
    return pixels, paddle.to_tensor(text["input_ids"]), paddle.to_tensor(text["attention_mask"])


def _vision_state(model):
    return {k: v.numpy() for k, v in model.vision_model.state_dict().items()}


# -- structure --------------------------------------------------------------------------------------


def test_registered_and_saved_self_contained(family, model_dir):
    assert "bert_clip" in list_families(kind=DUAL_ENCODER) and family.kind == DUAL_ENCODER
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model_state.pdparams", "vocab.txt", "preprocessor_config.json", MODEL_INFO_FILE} <= names
    info = read_model_info(model_dir)
    assert info["family"] == "bert_clip" and info["init"] == "tiny" and info["lock_image_tower"] is True
    assert info["image_size"] == 64 and info["embedding_dim"] == 64
    # The evaluation length is clamped to the tiny BERT's position table.
    assert info["eval_max_len"] == info["max_text_len"] == 64
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "bert_clip" and config["logit_scale_init_value"] == LOGIT_SCALE_INIT
    processor = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == pytest.approx(list(CLIP_MEAN)) and processor["image_std"] == pytest.approx(list(CLIP_STD))
    transform = family.image_transform(64, train=False)
    assert transform.mean == CLIP_MEAN and transform.std == CLIP_STD


def test_features_are_projected_pooled_outputs(family, model_dir, tmp_path):
    model = family.load_model(model_dir)
    tokenizer = family.load_tokenizer(model_dir)
    pixels, ids, mask = _inputs(family, tokenizer)
    assert model.visual_projection.bias is None and model.text_projection.bias is None
    assert model.visual_projection.weight.shape == [128, 64] and model.text_projection.weight.shape == [64, 64]
    with paddle.no_grad():
        out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        # image: projection of ln_post([CLS]); text: projection of BERT's pooler output (tanh dense over [CLS]).
        hidden = model.vision_model(pixel_values=pixels, return_dict=True).last_hidden_state
        image = F.normalize(paddle.matmul(model.vision_model.ln_post(hidden[:, 0]), model.visual_projection.weight), axis=-1)
        sequence = model.text_model(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
        pooled = paddle.tanh(model.text_model.pooler.dense(sequence[:, 0]))
        text = F.normalize(paddle.matmul(pooled, model.text_projection.weight), axis=-1)
    np.testing.assert_allclose(out.image_features.numpy(), image.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.text_features.numpy(), text.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out.text_features.numpy(), axis=1), 1.0, rtol=1e-5)
    assert float(out.logit_scale) == pytest.approx(math.exp(2.6592), rel=1e-6)
    assert model.no_weight_decay_names() == {"log_logit_scale"} and model.embedding_dim == 64

    # Reload of a copy gives the same features bit for bit.
    family.save_atomic(model, tokenizer, tmp_path / "copy")
    again = family.load_model(tmp_path / "copy")
    with paddle.no_grad():
        np.testing.assert_array_equal(again.encode_images(pixels).numpy(), out.image_features.numpy())
        np.testing.assert_array_equal(again.encode_texts(ids, attention_mask=mask).numpy(), out.text_features.numpy())

    model.log_logit_scale.set_value(paddle.to_tensor([9.0]))
    model.clamp_logit_scale_()
    assert float(model.logit_scale()) == pytest.approx(100.0, rel=1e-5)


def test_tiny_is_deterministic_and_validated(family, model_dir):
    first, _ = family.build_tiny(model_dir / "vocab.txt", seed=0)
    other, _ = family.build_tiny(model_dir / "vocab.txt", seed=1)
    loaded = family.load_model(model_dir)
    state, other_state = first.state_dict(), other.state_dict()
    for name, value in loaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[name].numpy(), err_msg=name)
    assert not np.array_equal(state["vision_model.conv1.weight"].numpy(), other_state["vision_model.conv1.weight"].numpy())
    with pytest.raises(ConfigError, match="unknown bert_clip tiny"):
        family.build_tiny(model_dir / "vocab.txt", width=3)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        family.build_tiny(model_dir / "vocab.txt", image_size=60)


# -- LiT --------------------------------------------------------------------------------------------


def test_locked_tower_gets_no_gradient_and_stays_in_eval_mode(family, model_dir):
    model = family.load_model(model_dir)
    tokenizer = family.load_tokenizer(model_dir)
    vision_names = {name for name, _ in model.named_parameters() if name.startswith("vision_model.")}
    assert model.image_tower_locked and model.frozen_parameter_names() == vision_names and len(vision_names) > 10
    assert "visual_projection.weight" not in model.frozen_parameter_names()  # trainable, as in the seed

    model.train()
    assert model.training and model.text_model.training
    assert not any(layer.training for layer in [model.vision_model, *model.vision_model.sublayers()])
    # A wrapper (paddle.DataParallel) flips every sublayer's mode without calling the model's train().
    paddle.nn.Layer.train(model)
    assert model.vision_model.training
    pixels, ids, mask = _inputs(family, tokenizer)
    out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    assert not any(layer.training for layer in [model.vision_model, *model.vision_model.sublayers()])
    loss = model.contrastive_loss(out)
    loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    assert all(grads[name] is None for name in vision_names)
    for name in ("visual_projection.weight", "text_projection.weight", "log_logit_scale",
                 "text_model.embeddings.word_embeddings.weight"):
        assert grads[name] is not None and float(paddle.abs(grads[name]).sum()) > 0, name

    # Unlocked (lit: false) everything trains, and the trainer's view agrees.
    assert apply_freezing(model, False) == set()
    assert not any(p.stop_gradient for p in model.parameters())
    model.train()
    assert model.vision_model.training
    assert len(trainable_parameters(model)) == len(list(model.parameters()))
    assert apply_freezing(model, True) == vision_names
    assert {name for name, _ in trainable_parameters(model)} == {name for name, _ in model.named_parameters()} - vision_names


def test_lit_hparam_is_validated_and_needs_a_lockable_tower(tmp_path):
    assert resolve_hparams()["lit"] is None and resolve_hparams({"lit": False})["lit"] is False
    with pytest.raises(ConfigError, match="lit"):
        resolve_hparams({"lit": "yes"})
    ernie_dir = prepare_initial_model("ernie_vil", "tiny", tmp_path / "ernie", vocab_texts=CAPTIONS, seed=0)
    ernie = get_family("ernie_vil").load_model(ernie_dir)
    assert apply_freezing(ernie, None) == set() and apply_freezing(ernie, False) == set()
    with pytest.raises(ConfigError, match="no image tower to lock"):
        apply_freezing(ernie, True)
    with pytest.raises(ConfigError, match="cannot be assembled from separate towers"):
        prepare_initial_model("ernie_vil", {"vision": "a", "text": "b"}, tmp_path / "x")


# -- initialisation from separate towers ------------------------------------------------------------


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """A tiny CLIP (full model, as openai/clip-* are published) and a tiny BERT with its tokenizer."""
    root = tmp_path_factory.mktemp("towers")
    paddle.seed(11)
    clip = CLIPModel(CLIPConfig(
        text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                     "vocab_size": 100, "max_position_embeddings": 16},
        vision_config={"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 96,
                       "image_size": 32, "patch_size": 8},
        projection_dim=24,
    ))
    clip.save_pretrained(str(root / "clip"))
    paddle.seed(12)
    build_vocab_file(CAPTIONS, root / "vocab.txt")
    bert = BertModel(BertConfig(vocab_size=len((root / "vocab.txt").read_text().splitlines()), hidden_size=40,
                                num_hidden_layers=2, num_attention_heads=2, intermediate_size=80,
                                max_position_embeddings=32, pad_token_id=0))
    bert.save_pretrained(str(root / "bert"))
    BertTokenizer(vocab_file=str(root / "vocab.txt")).save_pretrained(str(root / "bert"))
    vision_only = CLIPVisionModel(CLIPVisionConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=96, image_size=32, patch_size=8))
    vision_only.save_pretrained(str(root / "vision_only"))
    return {"root": root, "clip": clip, "bert": bert, "vision_only": vision_only}


def test_init_from_pretrained_towers(family, towers, tmp_path):
    root = towers["root"]
    out = prepare_initial_model("bert_clip", {"vision": str(root / "clip"), "text": str(root / "bert")}, tmp_path / "init")
    info = read_model_info(out)
    assert info["init"] == {"vision": str(root / "clip"), "text": str(root / "bert")}
    model = family.load_model(out)
    assert model.image_tower_locked and model.embedding_dim == 24 and family.image_size(model) == 32
    for name, value in towers["clip"].vision_model.state_dict().items():
        np.testing.assert_array_equal(model.vision_model.state_dict()[name].numpy(), value.numpy(), err_msg=name)
    # The visual projection comes with a full CLIP checkpoint (as in the seed); the text one is new.
    np.testing.assert_array_equal(model.visual_projection.weight.numpy(), towers["clip"].vision_projection.numpy())
    assert model.text_projection.weight.shape == [40, 24]
    for name, value in towers["bert"].state_dict().items():
        np.testing.assert_array_equal(model.text_model.state_dict()[name].numpy(), value.numpy(), err_msg=name)
    tokenizer = family.load_tokenizer(out)
    assert tokenizer.convert_ids_to_tokens(family.tokenize(tokenizer, ["红色"], max_len=8)["input_ids"][0].tolist()) == [
        "[CLS]", "红", "色", "[SEP]"
    ]

    # A vision-only CLIP checkpoint has no projection: both start random at the default width.
    bare = family.load_towers({"vision": str(root / "vision_only"), "text": str(root / "bert")})[0]
    assert bare.embedding_dim == 512 and bare.visual_projection.weight.shape == [48, 512]
    for name, value in towers["vision_only"].vision_model.state_dict().items():
        np.testing.assert_array_equal(bare.vision_model.state_dict()[name].numpy(), value.numpy(), err_msg=name)


def test_tower_init_errors(family, towers, tmp_path):
    root = towers["root"]
    with pytest.raises(ConfigError, match="missing \\['text'\\], unknown \\['txt'\\]"):
        family.load_towers({"vision": str(root / "clip"), "txt": str(root / "bert")})
    with pytest.raises(ConfigError, match="model directory not found"):
        family.load_towers({"vision": str(tmp_path / "absent"), "text": str(root / "bert")})
    # No network here: a pretrained name fails with the project's download error, naming the way out.
    with pytest.raises(DownloadError, match="openai/clip-vit-base-patch32.*pass the local directory"):
        prepare_initial_model("bert_clip", {"vision": "openai/clip-vit-base-patch32", "text": str(root / "bert")},
                              tmp_path / "m")
    with pytest.raises(DownloadError, match="bert-base-chinese"):
        family.load_towers({"vision": str(root / "clip"), "text": "bert-base-chinese"})
    assert not (tmp_path / "m").exists()


def test_text_tower_reloads_as_plain_bert(family, model_dir, tmp_path):
    model = family.load_model(model_dir)
    tokenizer = family.load_tokenizer(model_dir)
    save_text_tower(model, tokenizer, tmp_path / "bert")
    bert = BertModel.from_pretrained(str(tmp_path / "bert"))
    bert_tokenizer = BertTokenizer.from_pretrained(str(tmp_path / "bert"))
    bert.eval()
    encoded = bert_tokenizer(CAPTIONS, padding="longest", return_attention_mask=True, return_token_type_ids=False)
    np.testing.assert_array_equal(np.asarray(encoded["input_ids"]), family.tokenize(tokenizer, CAPTIONS, max_len=64)["input_ids"])
    ids, mask = paddle.to_tensor(encoded["input_ids"]), paddle.to_tensor(encoded["attention_mask"])
    with paddle.no_grad():
        expected = model.text_model(input_ids=ids, attention_mask=mask, return_dict=False)
        got = bert(input_ids=ids, attention_mask=mask, return_dict=False)
        np.testing.assert_array_equal(got[0].numpy(), expected[0].numpy())
        np.testing.assert_array_equal(got[1].numpy(), expected[1].numpy())
        features = F.normalize(model.text_projection(got[1]), axis=-1)
        np.testing.assert_array_equal(features.numpy(), model.encode_texts(ids, attention_mask=mask).numpy())


def test_text_tower_command_writes_the_same_bert(family, model_dir, tmp_path, capsys):
    from vlretrieval.models.bert_clip import main

    assert main(["--model", str(model_dir), "--out", str(tmp_path / "cli_bert")]) == 0
    assert "written to" in capsys.readouterr().out
    bert = BertModel.from_pretrained(str(tmp_path / "cli_bert"))
    expected = family.load_model(model_dir).text_model.state_dict()
    got = bert.state_dict()
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name].numpy(), value.numpy())
    assert not [p for p in tmp_path.iterdir() if p.name != "cli_bert"]  # no staging directory left behind


# -- training ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_rank_lit_training_moves_only_the_text_side(family, tmp_path):
    spec = DemoSpec(name="demo_bc", seed=3, sizes={"train": 16})
    write_demo_archive(spec, tmp_path / "demo.zip")
    with zipfile.ZipFile(tmp_path / "demo.zip") as archive:
        archive.extractall(tmp_path / "sources")
    split = tmp_path / "lmdb" / "train"
    serialize_split("raw_tsv", tmp_path / "sources", "train", split, entry={"root": "demo_bc"}, progress=False)
    init = prepare_initial_model("bert_clip", "tiny", tmp_path / "init", vocab_texts=vocab_texts_from_split(split), seed=0)
    work, final = tmp_path / "work", tmp_path / "final"
    hparams = {"per_device_train_batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 1, "max_steps": 3,
               "save_steps": 3, "hflip": False, "seed": 7}
    try:
        launch_finetune(init, split, work, final, n_ranks=2, use_gpu=False, hparams=hparams)
    except FinetuneError as exc:
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((work / "launch_logs").glob("workerlog.*")))
        raise AssertionError(f"{exc}\n{logs}") from None

    before, after = family.load_model(init), family.load_model(final)
    start = read_train_log(work / TRAIN_LOG)[0]
    n_frozen = len(before.frozen_parameter_names())
    assert start["world_size"] == 2 and start["frozen_parameters"] == n_frozen
    assert start["trainable_parameters"] == len(list(before.parameters())) - n_frozen
    for name, value in _vision_state(before).items():
        np.testing.assert_array_equal(_vision_state(after)[name], value, err_msg=name)
    for name in ("text_model.embeddings.word_embeddings.weight", "text_model.pooler.dense.weight",
                 "text_projection.weight", "visual_projection.weight"):
        assert not np.array_equal(before.state_dict()[name].numpy(), after.state_dict()[name].numpy()), name
    assert after.image_tower_locked

    # The optimizer holds state (two Adam moments) for exactly the trainable parameters.
    optimizer_state = paddle.load(str(work / "checkpoint-3" / "optimizer.pdopt"))
    moment_shapes = sorted(tuple(v.shape) for k, v in optimizer_state.items() if k.endswith("_moment1_0"))
    trainable_shapes = sorted(tuple(p.shape) for _, p in trainable_parameters(before))
    assert moment_shapes == trainable_shapes
    assert sum(k.endswith("_moment2_0") for k in optimizer_state) == len(trainable_shapes)
    vision_only_shapes = {tuple(before.vision_model.conv1.weight.shape), tuple(before.vision_model.positional_embedding.weight.shape)}
    assert not vision_only_shapes & set(moment_shapes)
