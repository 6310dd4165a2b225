"""The fine-tuned dual encoder logged as an MLflow model of its training run: loaded back through
mlflow.pyfunc it gives the features feature extraction writes; registered when asked. Real tiny
ERNIE-ViL, real LMDB split, real SQLite store."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from vlretrieval.data.demo import DemoSpec, write_demo_archive
from vlretrieval.data.download import safe_extract
from vlretrieval.data.lmdb_store import SplitStore, serialize_split
from vlretrieval.errors import DataError
from vlretrieval.models.base import MODEL_INFO_FILE
from vlretrieval.models.prepare import prepare_initial_model, vocab_texts_from_split
from vlretrieval.retrieval.extract import extract_split, feature_paths
from vlretrieval.retrieval.features import load_features
from vlretrieval.tracking.mlflow_tracking import track_pair

from .test_tracking import STEPS, TRAIN_START, make_pair


@pytest.fixture(scope="module")
def split_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked_model")
    write_demo_archive(DemoSpec(name="tm", sizes={"test": 6}, seed=7), root / "tm.zip")
    safe_extract(root / "tm.zip", root / "raw")
    serialize_split("raw_tsv", root / "raw", "test", root / "lmdb", entry={"format": "raw_tsv", "root": "tm"},
                    progress=False)
    prepare_initial_model("ernie_vil", "tiny", root / "model", vocab_texts=vocab_texts_from_split(root / "lmdb"))
    return root / "lmdb", root / "model"


def test_the_logged_model_reproduces_the_extracted_features(split_and_model, tmp_path):
    import mlflow.pyfunc
    from mlflow import MlflowClient

    split, model_dir = split_and_model
    pair = make_pair(tmp_path)
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    result = track_pair(tracking_uri=uri, config_hash="cfg1", finetuned_model=model_dir,
                        registered_model="demo_cn-ernie_vil", **pair)
    client = MlflowClient(uri)
    finetune = client.get_run(result["runs"]["finetune"])
    [output] = finetune.outputs.model_outputs
    assert result["model_uri"] == f"models:/{output.model_id}"
    # Logging the model keeps the run's own times.
    assert finetune.info.status == "FINISHED"
    assert finetune.info.end_time == int((TRAIN_START + STEPS + 0.5) * 1000)
    [version] = client.search_model_versions("name = 'demo_cn-ernie_vil'")
    assert version.run_id == finetune.info.run_id

    # Tracking again keeps the one logged model and version.
    again = track_pair(tracking_uri=uri, config_hash="cfg1", finetuned_model=model_dir,
                       registered_model="demo_cn-ernie_vil", **pair)
    assert again["model_uri"] == result["model_uri"]
    assert len(client.get_run(result["runs"]["finetune"]).outputs.model_outputs) == 1
    assert len(client.search_model_versions("name = 'demo_cn-ernie_vil'")) == 1

    extract_split(model_dir, split, tmp_path / "features", engine="dynamic", image_batch_size=4, text_batch_size=5,
                  progress=False)
    images, texts = (load_features(p) for p in feature_paths(tmp_path / "features"))
    with SplitStore(split) as store:
        image_bytes = [store.image_bytes(image_id) for image_id in images.ids.tolist()]
        captions = {record.text_id: record.text for record in store.texts()}
    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.pyfunc.load_model(result["model_uri"])
    finally:
        mlflow.set_tracking_uri(None)
    image_features = loaded.predict(pd.DataFrame({"image": image_bytes}))
    text_features = loaded.predict(pd.DataFrame({"text": [captions[t] for t in texts.ids.tolist()]}))
    assert image_features.shape == images.vectors.shape and text_features.shape == texts.vectors.shape
    np.testing.assert_allclose(image_features, images.vectors, atol=1e-5)
    np.testing.assert_allclose(text_features, texts.vectors, atol=1e-5)
    with pytest.raises(DataError, match=r"\(row 1\): each row needs exactly one"):
        loaded.predict(pd.DataFrame({"image": [image_bytes[0], None], "text": [None, None]}))


def test_only_a_dual_encoder_is_logged_and_telling_costs_no_paddle(split_and_model, tmp_path):
    import subprocess
    import sys

    _, model_dir = split_and_model
    cross = tmp_path / "cross"
    cross.mkdir()
    (cross / MODEL_INFO_FILE).write_text(json.dumps({"family": "vinvl"}), encoding="utf-8")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from vlretrieval.errors import ConfigError\n"
        "from vlretrieval.tracking.mlflow_tracking.model import check_dual_encoder_dir\n"
        "check_dual_encoder_dir(Path(sys.argv[1]))\n"
        "try:\n"
        "    check_dual_encoder_dir(Path(sys.argv[2]))\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
        "print(sorted(name for name in ('paddle', 'paddlenlp') if name in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(model_dir), str(cross)], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == [f"{cross}: only a dual encoder is logged as an encoding model, vinvl is a cross_encoder", "[]"]
