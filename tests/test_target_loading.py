"""deepspec.target.loading: clear errors for a missing path or a folder that is not a model, weights from
safetensors only (regeneration included), trust_remote_code only when set."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import model_folder

from deepspec.target import loading
from deepspec.target.loading import TargetLoadError, open_target


def cfg_for(name, trust_remote_code=False):
    return OmegaConf.create(
        {"target": {"name_or_path": str(name), "trust_remote_code": trust_remote_code, "dtype": "float32"}}
    )


@pytest.fixture
def no_torch_load(monkeypatch):
    """Fail the test if anything reaches torch.load (a pickle: loading one can run code)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    return calls


@pytest.mark.parametrize("name", ["/no/such/model/folder", "./missing-model", "../a/b/c"])
def test_missing_path_says_it_does_not_exist(name):
    with pytest.raises(TargetLoadError, match=r"target.name_or_path=.*the path .* does not exist") as e:
        open_target(cfg_for(name))
    assert "Repo id" not in str(e.value)


def test_empty_folder_names_every_missing_file(tmp_path):
    with pytest.raises(TargetLoadError) as e:
        open_target(cfg_for(tmp_path))
    msg = str(e.value)
    assert f"{tmp_path} is not a model folder" in msg
    for what in ("config.json", "tokenizer files", "*.safetensors weights"):
        assert what in msg
    assert "sentencepiece" not in msg


def test_folder_without_tokenizer_says_so(tmp_path):
    folder = model_folder(tmp_path / "m")
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    with pytest.raises(TargetLoadError, match=r"missing tokenizer files \(one of tokenizer.json") as e:
        open_target(cfg_for(folder))
    assert ";" not in str(e.value).split("missing", 1)[1]  # the only thing missing


def test_a_file_is_not_a_model_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(TargetLoadError, match="is a file; expected a model folder"):
        open_target(cfg_for(f))


def test_bin_only_folder_is_refused_before_torch_load(tmp_path, no_torch_load):
    folder = model_folder(tmp_path / "m", safetensors=False)
    assert (folder / "pytorch_model.bin").is_file()
    with pytest.raises(TargetLoadError, match=r"found only pytorch_model.bin: pickle files"):
        open_target(cfg_for(folder))
    # Even past the folder check, transformers is told to read safetensors only.
    with pytest.raises(TargetLoadError, match="safetensors only"):
        loading.load_causal_lm(str(folder))
    assert no_torch_load == []


def test_local_regeneration_refuses_bin_weights(tmp_path, no_torch_load):
    from deepspec.data.regenerate import _local_backend

    folder = model_folder(tmp_path / "m", safetensors=False)
    cfg = OmegaConf.merge(cfg_for(folder), {"regen": {"device": "cpu", "seed": 0, "max_new_tokens": 4}})
    with pytest.raises(TargetLoadError, match="pickle files"):
        _local_backend(cfg, sampling=None, tkw={}, thinking=False)
    assert no_torch_load == []


def test_good_folder_loads_and_uses_safetensors(tmp_path, no_torch_load, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = model_folder(tmp_path / "m")
    info = open_target(cfg_for(folder))
    assert info.path == str(folder) and info.trust_remote_code is False
    assert info.config["model_type"] == "qwen3" and info.config["vocab_size"] == 32
    assert info.tokenizer.mask_token_id == 1

    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model = loading.load_causal_lm(info.path, "float32")
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False
    assert model.config.num_hidden_layers == 4
    assert no_torch_load == []


@pytest.mark.parametrize("trc", [False, True])
def test_trust_remote_code_passed_only_as_set(tmp_path, monkeypatch, trc):
    from transformers import AutoConfig, AutoTokenizer

    folder = model_folder(tmp_path / "m")
    seen = []
    for cls in (AutoConfig, AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, **kwargs):
            seen.append(kwargs["trust_remote_code"])
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    open_target(cfg_for(folder, trust_remote_code=trc))
    assert len(seen) >= 2 and set(seen) == {trc}  # AutoTokenizer also reads the config itself


@pytest.mark.parametrize(
    "name,hub",
    [
        ("Qwen/Qwen3-8B", True),
        ("gpt2", True),
        ("meta-llama/Llama-3.1-8B-Instruct", True),
        ("/abs/path", False),
        ("a/b/c", False),
        ("./x", False),
        ("org--x/y", False),
        ("a/../b", False),
    ],
)
def test_hub_id_shape(name, hub):
    assert loading.looks_like_hub_id(name) is hub
