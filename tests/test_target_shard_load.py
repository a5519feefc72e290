"""``target.shard=fsdp`` loading (deepspec/target/shard_load.py) in one process (a 1-rank gloo group):
the target built on the meta device and filled from safetensors gives the unsharded target's features
exactly, for tied embeddings, split checkpoints, dtype conversion and every family; bad folders are
named. Row slicing over 2 real ranks: test_target_shard.py."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_target

from deepspec.target.adapter import TargetModel
from deepspec.target.loading import TargetLoadError
from deepspec.target.shard_load import load_sharded_target, shard_rows

IDS = [0, 2, 3]


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def save(folder, family="qwen3", shard_size=None, **kw):
    model = tiny_target(family, vocab=101, **kw)  # odd vocabulary: uneven Shard(0) chunks on 2 ranks
    model.save_pretrained(str(folder), **({"max_shard_size": shard_size} if shard_size else {}))
    return folder


def assert_same_features(folder, dtype="float32"):
    whole = TargetModel.from_pretrained(str(folder), IDS, dtype)
    sharded = load_sharded_target(str(folder), IDS, dtype)
    assert sharded.sharded
    x = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    a, b = whole(x, with_logits=True), sharded(x, with_logits=True)
    for name in ("aux", "final", "logits"):
        assert getattr(b, name).dtype == getattr(a, name).dtype
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(whole.embed_tokens.weight, sharded.embed_tokens.weight)
    assert torch.equal(whole.lm_head.weight, sharded.lm_head.weight)
    for (name, want), (_, got) in zip(whole.model.named_buffers(), sharded.model.named_buffers()):
        assert torch.equal(want, got), name  # rotary inv_freq & co. were not left as empty memory
    return sharded


@pytest.mark.parametrize(
    "rows,world,want", [(101, 2, [(0, 51), (51, 101)]), (3, 4, [(0, 1), (1, 2), (2, 3), (3, 3)])]
)
def test_shard_rows_follow_torch_chunk(rows, world, want):
    assert [shard_rows(rows, r, world) for r in range(world)] == want
    chunks = torch.arange(rows).chunk(world)
    for r, (start, stop) in enumerate(want):
        got = chunks[r].tolist() if r < len(chunks) else []
        assert got == list(range(start, stop))


@pytest.mark.parametrize("family", ["qwen3", "llama", "gemma4"])
def test_features_equal_the_unsharded_target(group, tmp_path, family):
    assert_same_features(save(tmp_path, family, tie_word_embeddings=False))


def test_tied_embeddings_stay_tied(group, tmp_path):
    sharded = assert_same_features(save(tmp_path, tie_word_embeddings=True))
    assert sharded.model.get_output_embeddings().weight is sharded.model.get_input_embeddings().weight


def test_split_checkpoint_with_an_index(group, tmp_path):
    folder = save(tmp_path, shard_size="20KB", tie_word_embeddings=False)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2
    assert_same_features(folder)


def test_dtype_conversion(group, tmp_path):
    sharded = assert_same_features(save(tmp_path, tie_word_embeddings=False), "bfloat16")
    assert {p.dtype for p in sharded.model.parameters()} == {torch.bfloat16}


def test_folder_without_safetensors_is_refused(group, tmp_path):
    model = tiny_target(vocab=101)
    model.config.save_pretrained(str(tmp_path))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(TargetLoadError, match=r"has no \*.safetensors weights.*pytorch_model.bin: pickle"):
        load_sharded_target(str(tmp_path), IDS)


def test_index_naming_a_missing_file_is_refused(group, tmp_path):
    folder = save(tmp_path, shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"].values()))
    (folder / name).unlink()
    with pytest.raises(TargetLoadError, match=rf"index.json: tensor .* is in '{name}', which is not in"):
        load_sharded_target(str(folder), IDS)


def test_checkpoint_missing_a_parameter_names_it(group, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save(tmp_path, tie_word_embeddings=False)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        TargetLoadError, match=r"no tensor named \['model.layers.1.mlp.up_proj.weight'\].*shard=none"
    ):
        load_sharded_target(str(folder), IDS)


def test_shape_mismatch_names_file_and_tensor(group, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save(tmp_path, tie_word_embeddings=False)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:100].contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        TargetLoadError,
        match=r"model.safetensors: tensor 'lm_head.weight' has shape \[100, 32\].*expects \[101, 32\]",
    ):
        load_sharded_target(str(folder), IDS)


def test_untied_embedding_and_lm_head_are_units_of_their_own(group, tmp_path):
    from torch.distributed.fsdp import FSDPModule

    sharded = load_sharded_target(str(save(tmp_path, tie_word_embeddings=False)), IDS)
    m = sharded.model
    assert isinstance(m.get_input_embeddings(), FSDPModule) and isinstance(
        m.get_output_embeddings(), FSDPModule
    )


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_rows_read_equal_safetensors_slices(tmp_path, file_dtype, out_dtype):
    from safetensors.torch import save_file

    from deepspec.target.safetensors_rows import SafetensorsFile

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 5, generator=g).to(file_dtype), "s": torch.tensor(3.5).to(file_dtype)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert sorted(f.keys()) == ["a", "s"]
    for start, stop in [(0, 7), (0, 4), (4, 7), (3, 3)]:
        out = torch.full((stop - start, 5), -1.0, dtype=out_dtype)
        f.read_rows("a", start, stop, out)
        assert torch.equal(out, tensors["a"][start:stop].to(out_dtype))
    out = torch.zeros((), dtype=out_dtype)
    f.read_rows("s", 0, 0, out)
    assert out.item() == 3.5


def test_damaged_safetensors_files_are_named(tmp_path):
    from safetensors.torch import save_file

    from deepspec.target.safetensors_rows import SafetensorsFile

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(4, 2)}, str(path))
    good = path.read_bytes()
    path.write_bytes(good[:-8])  # data cut short
    with pytest.raises(
        TargetLoadError, match=r"x.safetensors: tensor 'a' \(F32 \[4, 2\]\) claims bytes 0..32 of 24"
    ):
        SafetensorsFile(path).info("a")
    path.write_bytes(b"\xff" * 8 + good[8:])  # header length beyond the file
    with pytest.raises(TargetLoadError, match=r"x.safetensors: not a safetensors file \(header length"):
        SafetensorsFile(path)
    n = int.from_bytes(good[:8], "little")
    path.write_bytes(good[:8] + b"x" + good[9 : 8 + n] + good[8 + n :])  # broken JSON, same length
    with pytest.raises(TargetLoadError, match=r"x.safetensors: unreadable safetensors header"):
        SafetensorsFile(path)
    path.write_bytes(good)
    with pytest.raises(TargetLoadError, match=r"x.safetensors: no tensor 'b' in it"):
        SafetensorsFile(path).info("b")
