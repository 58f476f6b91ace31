"""`qexport export --layout triton-repo`: a Triton Inference Server model repository. Its config.pbtxt is parsed
with tritonclient's ModelConfig (the schema Triton reads) and checked against the ONNX graph; the graph in the
version folder runs in ONNX Runtime with its external weights beside it. (No Triton server runs here.)"""

from __future__ import annotations

import numpy as np
import pytest

from qexport.cli import main

from tiny import save_tiny_checkpoint

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def _config(path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())  # unknown fields are errors


def test_the_repository_layout_and_its_config_match_the_graph(tmp_path, capsys):
    folder = save_tiny_checkpoint(tmp_path / "tiny")
    repo = tmp_path / "repo"
    (repo / "other" / "1").mkdir(parents=True)  # a model already in the repository stays
    assert main(["export", "--model", str(folder), "--recipe", "w8", "--out", str(repo), "--layout", "triton-repo",
                 "--attention-form", "standard"]) == 0
    assert "wrote" in capsys.readouterr().out
    model_dir = repo / "tiny-w8"
    assert sorted(p.name for p in repo.iterdir()) == ["other", "tiny-w8"]
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.onnx"]
    files = {p.name for p in model_dir.iterdir()}
    assert {"config.pbtxt", "config.json", "export_report.json", "tokenizer.json"} <= files
    assert not list(tmp_path.glob(".repo.*"))  # the work folder is gone

    cfg = _config(model_dir / "config.pbtxt")
    assert cfg.name == "tiny-w8" and cfg.backend == "onnxruntime" and cfg.max_batch_size == 0
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
    types = {onnx.TensorProto.INT64: model_config_pb2.TYPE_INT64, onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32}
    for ours, theirs in ((cfg.input, graph.input), (cfg.output, graph.output)):
        assert [t.name for t in ours] == [v.name for v in theirs]
        for t, v in zip(ours, theirs):
            assert t.data_type == types[v.type.tensor_type.elem_type]
            shape = v.type.tensor_type.shape.dim
            assert list(t.dims) == [d.dim_value if d.HasField("dim_value") else -1 for d in shape]
    names = [t.name for t in cfg.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "past_key_values.0.key" in names
    assert list(cfg.input[0].dims) == [-1, -1] and "logits" == cfg.output[0].name

    # the graph runs from the version folder, fed as the config says
    sess = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.ones((1, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64),
             "position_ids": np.arange(4, dtype=np.int64)[None]}
    for t in cfg.input[3:]:  # an empty cache: batch 1, past 0, the fixed sizes as the config states them
        assert t.data_type == model_config_pb2.TYPE_FP32 and list(t.dims)[::2] == [-1, -1]
        feeds[t.name] = np.zeros([1, t.dims[1], 0, t.dims[3]], np.float32)
    logits = sess.run(["logits"], feeds)[0]
    assert logits.shape[:2] == (1, 4) and np.isfinite(logits).all()

    # the same name again: refused unless --force; another name beside it
    again = ["export", "--model", str(folder), "--recipe", "w8", "--out", str(repo), "--layout", "triton-repo"]
    assert main(again) == 2
    assert "tiny-w8" in capsys.readouterr().err
    assert main(again[:4] + ["w4g64-sym"] + again[5:] + ["--triton-name", "tiny-int4"]) == 0
    assert _config(repo / "tiny-int4" / "config.pbtxt").name == "tiny-int4"
    assert main(["export", "--model", str(folder), "--recipe", "w8", "--out", str(repo), "--triton-name", "x"]) == 2
    assert main(["export", "--model", str(folder), "--recipe", "w8", "--out", str(repo), "--layout", "triton-repo",
                 "--triton-name", "a/b"]) == 2
    assert "Triton model name 'a/b'" in capsys.readouterr().err
