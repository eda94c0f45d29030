"""nanoabsorber.train_utils: the settings (one default each, validated for the Python API too),
the learning-rate schedule, saving a LoRA model merged without disturbing training, and the
training-state file."""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

import train
from nanoabsorber import load
from nanoabsorber.checkpoint import save_checkpoint
from nanoabsorber.errors import CheckpointError, ConfigError
from nanoabsorber.lora import LoRAConfig, lora_modules
from nanoabsorber.train_utils import (DataConfig, ModelConfig, OptimConfig, TrainConfig, get_lr, load_optimizer_tensors,
                                      lora_merged, optimizer_tensors, param_groups, read_train_state,
                                      read_train_state_info, save_train_state, signature_diff)
from tests.conftest import lora_model


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "d.txt").write_text("some text\n")
    return str(tmp_path / "d.txt"), str(tmp_path / "out")


def trained_lora_model():
    model = lora_model()
    for m in lora_modules(model):                     # a non-zero update to merge
        torch.nn.init.normal_(m.lora_B, std=0.05)
    return model


def test_flags_and_dataclasses_share_one_default(paths):
    data, out = paths
    args = train.build_parser().parse_args(["--data", data, "--out", out])
    from_flags, _ = train.parse_config(["--data", data, "--out", out])
    assert from_flags == TrainConfig(data=DataConfig(data=data, out=out))
    assert from_flags.lora == LoRAConfig() and args.lora_alpha == LoRAConfig().alpha == 32.0
    assert args.batch_size == OptimConfig().batch_size


def test_resolved_settings():
    lrs = {}
    for init, lora in [(None, False), ("default", False), ("default", True)]:
        cfg = TrainConfig(data=DataConfig(data=".", out="o"), model=ModelConfig(init=init, lora=lora))
        r = cfg.resolved("cpu")
        lrs[init, lora] = r.optim.lr
        assert r.optim.min_lr == pytest.approx(r.optim.lr / 10) and r.optim.decay_steps == r.optim.max_steps
        assert r.system.dtype == "float32" and cfg.resolved("cuda:1").system.dtype == "bfloat16"
        assert cfg.optim.lr is None                                      # resolved() returns a copy
    assert lrs == {(None, False): 1e-3, ("default", False): 1e-4, ("default", True): 1e-3}
    explicit = dataclasses.replace(cfg, optim=OptimConfig(lr=0.5, min_lr=0.0, decay_steps=7)).resolved("cpu")
    assert (explicit.optim.lr, explicit.optim.min_lr, explicit.optim.decay_steps) == (0.5, 0.0, 7)


def test_python_api_is_validated_like_the_flags():
    with pytest.raises(ConfigError, match="batch_size: must be > 0"):
        OptimConfig(batch_size=0)
    with pytest.raises(ConfigError, match="dim: cannot be combined with --init"):
        ModelConfig(init="default", dim=64)
    with pytest.raises(ConfigError, match="lora: needs --init"):
        ModelConfig(lora=True)
    with pytest.raises(ConfigError, match="n_heads: dim 100 is not divisible by n_heads 3"):
        ModelConfig(dim=100, n_heads=3)
    with pytest.raises(ConfigError, match="data: is required"):
        DataConfig(out="o")
    with pytest.raises(ConfigError, match="tokenizer: cannot be combined with --init"):
        TrainConfig(data=DataConfig(data=".", out="o", tokenizer="."), model=ModelConfig(init="default"))
    assert ModelConfig(preset="small", n_layers=3).llama_config(300).n_layers == 3


def test_lr_schedule():
    lrs = [get_lr(s, 1.0, 0.1, 10, 100) for s in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.55)
    assert lrs[100] == lrs[119] == 0.1 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_lora_merged_checkpoint_equals_the_lora_model_and_training_weights_stay_bit_exact(tmp_path):
    model = trained_lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        want = model(x)
    with lora_merged(model):
        path = save_checkpoint(model, tmp_path / "ckpt", extra_metadata={"step": 3})
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)                     # bit for bit
    assert not any(m.merged for m in lora_modules(model))
    plain, _ = load(tmp_path / "ckpt", tokenizer=False)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, rtol=1e-4, atol=1e-5)            # the update is in
    saved = load_file(path)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved[q], before["layers.0.attn.wq.weight"])
    assert not any("lora" in k for k in saved)
    # an exception inside the block still puts the training weights back
    with pytest.raises(RuntimeError):
        with lora_merged(model):
            raise RuntimeError("disk full")
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_train_state_round_trip(tmp_path):
    model = trained_lora_model()
    groups, names = param_groups(model, 0.1)
    assert all("lora_" in n for n in names)                     # only LoRA trains
    opt = torch.optim.AdamW(groups, lr=1e-2)
    model(torch.randint(0, 97, (2, 16))).sum().backward()
    opt.step()
    tensors = {f"param.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    tensors.update(optimizer_tensors(opt, names))
    save_train_state(tmp_path / "s.safetensors", tensors, {"step": 5, "data": {"epoch": 1}})
    assert read_train_state_info(tmp_path / "s.safetensors") == {"step": 5, "data": {"epoch": 1}}
    loaded, info = read_train_state(tmp_path / "s.safetensors")
    opt2 = torch.optim.AdamW(param_groups(model, 0.1)[0], lr=1e-2)
    load_optimizer_tensors(opt2, names, loaded)
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    with pytest.raises(ValueError, match="unknown parameter"):
        load_optimizer_tensors(opt2, names[1:], loaded)
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="not a nanoabsorber training-state file"):
        read_train_state_info(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable"):
        read_train_state_info(tmp_path / "junk.safetensors")


def test_signature_diff():
    saved = {"model": {"dim": 32, "n_layers": 2}, "seed": 1, "data": [["a", 3]]}
    now = {"model": {"dim": 48, "n_layers": 2}, "seed": 1, "data": [["a", 4]]}
    assert signature_diff(saved, now) == ["data: saved [['a', 3]], now [['a', 4]]", "model.dim: saved 32, now 48"]
    assert signature_diff(saved, saved) == []
