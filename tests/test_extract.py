"""Feature extraction from a serialized split through a saved tiny dual encoder."""

from __future__ import annotations

import mmap
import multiprocessing
import shutil
import time

import lmdb
import numpy as np
import paddle
import pytest

from vlretrieval.data.demo import DemoSpec, write_demo_archive
from vlretrieval.data.download import safe_extract
from vlretrieval.data.lmdb_store import SplitStore, serialize_split
from vlretrieval.errors import ConfigError, DataError
from vlretrieval.models.prepare import prepare_initial_model, vocab_texts_from_split
from vlretrieval.models.base import load_model_dir
from vlretrieval.retrieval.extract import extract_split, feature_paths, prepared_batches
from vlretrieval.retrieval.features import load_features, read_reference_jsonl


@pytest.fixture(scope="module")
def split_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    write_demo_archive(DemoSpec(name="ex", sizes={"test": 9}, seed=5), root / "ex.zip")
    safe_extract(root / "ex.zip", root / "raw")
    serialize_split("raw_tsv", root / "raw", "test", root / "lmdb", entry={"format": "raw_tsv", "root": "ex"},
                    progress=False)
    prepare_initial_model("ernie_vil", "tiny", root / "model", vocab_texts=vocab_texts_from_split(root / "lmdb"))
    return root / "lmdb", root / "model"


def test_features_cover_the_split_in_store_order_and_are_normalised(split_and_model, tmp_path):
    split, model = split_and_model
    # batch sizes that do not divide the counts, so the last partial batch is exercised
    summary = extract_split(model, split, tmp_path / "f", engine="dynamic", image_batch_size=4, text_batch_size=7,
                            export_reference=True, progress=False)
    images, texts = (load_features(p) for p in feature_paths(tmp_path / "f"))
    with SplitStore(split) as store:
        assert images.ids.tolist() == store.image_ids()
        assert texts.ids.tolist() == [t.text_id for t in store.texts()]
    assert summary["num_images"] == 9 and summary["num_texts"] == 45
    for fs in (images, texts):
        assert fs.vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(fs.vectors, axis=1), 1.0, atol=1e-5)
    # the reference jsonl export carries the same vectors
    exported = read_reference_jsonl(tmp_path / "f" / "imgs.img_feat.jsonl", "image")
    np.testing.assert_array_equal(exported.ids, images.ids)
    np.testing.assert_allclose(exported.vectors, images.vectors, atol=1e-6)


def test_features_match_a_direct_forward_pass(split_and_model, tmp_path):
    split, model_dir = split_and_model
    extract_split(model_dir, split, tmp_path / "f", engine="dynamic", image_batch_size=64, text_batch_size=256, progress=False)
    images, texts = (load_features(p) for p in feature_paths(tmp_path / "f"))
    family, model, tokenizer, _ = load_model_dir(model_dir)
    transform = family.image_transform(model, train=False)
    with SplitStore(split) as store:
        first_image = store.open_image(store.image_ids()[0])
        first_text = store.texts()[0].text
    with paddle.no_grad():
        pixels = paddle.to_tensor(transform(first_image)[None])
        expected_image = model.encode_images(pixels).numpy()[0]
        encoded = family.tokenize(tokenizer, [first_text], max_len=family.eval_max_len)
        expected_text = model.encode_texts(
            paddle.to_tensor(encoded["input_ids"]), attention_mask=paddle.to_tensor(encoded["attention_mask"])
        ).numpy()[0]
    np.testing.assert_allclose(images.vectors[0], expected_image, atol=1e-5)
    np.testing.assert_allclose(texts.vectors[0], expected_text, atol=1e-5)


def test_context_length_truncates_texts(split_and_model, tmp_path):
    split, model_dir = split_and_model
    extract_split(model_dir, split, tmp_path / "short", engine="dynamic", image_batch_size=64, text_batch_size=256, max_len=4, progress=False)
    extract_split(model_dir, split, tmp_path / "long", engine="dynamic", image_batch_size=64, text_batch_size=256, max_len=64, progress=False)
    with pytest.raises(ConfigError, match="exceeds"):
        extract_split(model_dir, split, tmp_path / "too_long", engine="dynamic", image_batch_size=64, text_batch_size=256, max_len=65, progress=False)
    family, model, tokenizer, _ = load_model_dir(model_dir)
    with SplitStore(split) as store:
        captions = [t.text for t in store.texts()]
    # Texts that share their first two characters must get identical features at length 4
    # ([CLS] + 2 characters + [SEP]), and generally differ at full length.
    short = load_features(feature_paths(tmp_path / "short")[1]).vectors
    long = load_features(feature_paths(tmp_path / "long")[1]).vectors
    prefixes = [c[:2] for c in captions]
    same = [(i, j) for i in range(len(captions)) for j in range(i + 1, len(captions))
            if prefixes[i] == prefixes[j] and captions[i] != captions[j]]
    assert same, "the demo captions should share some two-character openings"
    for i, j in same[:10]:
        np.testing.assert_allclose(short[i], short[j], atol=1e-6)
    assert any(not np.allclose(long[i], long[j], atol=1e-4) for i, j in same[:10])
    encoded = family.tokenize(tokenizer, captions, max_len=4)
    assert encoded["input_ids"].shape[1] == 4


def test_extraction_refuses_a_directory_that_is_not_a_model(split_and_model, tmp_path):
    split, _ = split_and_model
    (tmp_path / "nomodel").mkdir()
    with pytest.raises(ConfigError, match="not a model directory"):
        extract_split(tmp_path / "nomodel", split, tmp_path / "f", engine="dynamic", image_batch_size=64, text_batch_size=256, progress=False)
    assert not (tmp_path / "f").exists()


def test_batches_prepared_by_workers_give_the_same_features_as_batches_prepared_in_turn(split_and_model, tmp_path):
    split, model = split_and_model
    # 9 images in batches of 2 and 45 texts in batches of 4: several batches in flight per worker,
    # and a partial last batch.
    for name, workers in (("in_turn", 0), ("workers", 2)):
        extract_split(model, split, tmp_path / name, engine="dynamic", image_batch_size=2, text_batch_size=4,
                      prefetch_workers=workers, progress=False)
    for in_turn, prefetched in zip(feature_paths(tmp_path / "in_turn"), feature_paths(tmp_path / "workers")):
        expected, got = load_features(in_turn), load_features(prefetched)
        assert got.ids.tolist() == expected.ids.tolist()
        assert got.vectors.tobytes() == expected.vectors.tobytes()
    assert multiprocessing.active_children() == []


def _numbered_batches(items, *, empty=np.empty):
    ids = empty((len(items),), np.int64)
    ids[:] = [item[0] for item in items]
    values = empty((len(items), *items[0][1].shape), np.float32)
    np.stack([item[1] for item in items], out=values)
    # An array built without ``empty`` (and so outside any slot) takes the pipe.
    squares = np.asarray([item[0] ** 2 for item in items], dtype=np.int64)
    return {"ids": ids, "values": values, "squares": squares, "names": [f"item-{item[0]}" for item in items]}


@pytest.mark.parametrize("slot_bytes", [0, 4096, 128])
def test_batches_from_shared_slots_equal_batches_prepared_in_turn(slot_bytes):
    # 23 items in batches of 3 on 2 workers: 8 batches through 4 slots, so every slot is reused.
    # 4096 bytes hold both arrays the collate function allocates; 128 hold the ids only (each array
    # starts on a 64-byte line), so the values take the pipe, as the squares always do.
    rng = np.random.default_rng(0)
    dataset = [(index, rng.standard_normal((5, 4)).astype(np.float32)) for index in range(23)]
    ids = [item[0] for item in dataset]
    kwargs = dict(batch_size=3, ids=ids, id_key="item", location="memory")
    expected = list(prepared_batches(dataset, _numbered_batches, workers=0, **kwargs))
    in_slot = {0: set(), 4096: {"ids", "values"}, 128: {"ids"}}[slot_bytes]
    got = []
    for number, batch in enumerate(prepared_batches(dataset, _numbered_batches, workers=2, slot_bytes=slot_bytes,
                                                    **kwargs)):
        if number > 0:  # the first batch is prepared by the consumer itself
            shared = {key for key, value in batch.items() if isinstance(getattr(value, "base", None), mmap.mmap)}
            assert shared == in_slot
        time.sleep(0.05)  # a slow consumer: a worker that reused this slot too early would have overwritten it
        got.append({key: value.copy() if isinstance(value, np.ndarray) else value for key, value in batch.items()})
    assert len(got) == len(expected) == 8
    for want, batch in zip(expected, got):
        assert batch["names"] == want["names"]
        assert batch["ids"].tolist() == want["ids"].tolist()
        assert batch["squares"].tolist() == [item_id ** 2 for item_id in want["ids"].tolist()]
        assert batch["values"].dtype == np.float32 and batch["values"].tobytes() == want["values"].tobytes()
    assert multiprocessing.active_children() == []


def test_a_record_that_cannot_be_prepared_stops_the_workers_and_is_named(split_and_model, tmp_path):
    split, model = split_and_model
    damaged = tmp_path / "lmdb"
    shutil.copytree(split, damaged)
    with SplitStore(damaged) as store:
        victim = store.image_ids()[5]
        data = store.image_bytes(victim)
    env = lmdb.open(str(damaged / "imgs"), lock=False)
    with env.begin(write=True) as txn:
        txn.put(str(victim).encode("ascii"), data[: len(data) // 3])  # a truncated image
    env.close()
    with pytest.raises(DataError, match=f"image_id={victim}") as caught:
        extract_split(model, damaged, tmp_path / "f", engine="dynamic", image_batch_size=2, text_batch_size=4,
                      prefetch_workers=2, progress=False)
    assert str(damaged) in str(caught.value) and "cannot prepare" in str(caught.value)
    assert multiprocessing.active_children() == []
    assert not (tmp_path / "f").exists()


def test_the_dynamic_graph_reads_batch_arrays_in_place_on_the_cpu_and_copies_the_rest():
    from vlretrieval.retrieval.extract import _batch_tensor_maker

    as_tensor = _batch_tensor_maker(paddle)
    batch = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensor = as_tensor(batch)
    batch[0, 0] = 42.0  # visible through the tensor: the same memory
    assert float(tensor[0, 0]) == 42.0 and tensor.numpy().tolist() == batch.tolist()
    frozen = batch.view()
    frozen.flags.writeable = False  # dlpack refuses read-only arrays
    strided = batch[:, ::2]
    copies = [as_tensor(frozen), as_tensor(strided)]
    batch[0, 0] = 7.0  # not visible through copies
    assert [float(copy[0, 0]) for copy in copies] == [42.0, 42.0]
    assert copies[1].numpy().tolist() == [[42.0, 2.0], [4.0, 6.0], [8.0, 10.0]]
