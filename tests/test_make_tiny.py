"""`nvlm-export make-tiny`: small random checkpoints that load and behave like real ones."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from nvlm_export.cli import _guarded
from nvlm_export.commands.make_tiny import make_tiny
from nvlm_export.models.checkpoint import load_checkpoint
from nvlm_export.models.model import build_model
from nvlm_export.models.tiny import tiny_config

torch.set_num_threads(1)

app = typer.Typer()
app.command()(_guarded(make_tiny))
runner = CliRunner()


def _run(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def _digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(directory.glob("*.safetensors")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("layout", ["nvlm-d", "internvl", "internvl-hf"])
def test_make_tiny_writes_a_small_loadable_checkpoint(layout: str, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    result = _run("--layout", layout, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and "parameters" in result.output
    total = sum(f.stat().st_size for f in out.iterdir())
    assert total < 5 * 1024**2
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        f.name for f in out.iterdir()
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left over
    model = load_checkpoint(out)
    assert model.config.vision.num_positions == 1025 and model.config.tokens_per_tile == 256
    assert model.config.llm_config["vocab_size"] % 64 == 0


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    for name, seed in [("a", "3"), ("b", "3"), ("c", "4")]:
        assert _run("--layout", "nvlm-d", "-o", str(tmp_path / name), "--seed", seed).exit_code == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_refuses_a_directory_it_did_not_write_and_replaces_a_checkpoint_only_with_overwrite(
    tmp_path: Path,
) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for flags in ((), ("--overwrite",)):
        result = _run("--layout", "internvl", "-o", str(out), *flags)
        assert result.exit_code == 2
        assert "is not a checkpoint" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert _run("--layout", "internvl", "-o", str(out)).exit_code == 0  # an empty directory
    result = _run("--layout", "internvl", "-o", str(out))
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert _run("--layout", "internvl", "-o", str(out), "--overwrite").exit_code == 0
    assert (out / "config.json").is_file()


def test_bench_size_is_only_for_internvl_layouts(tmp_path: Path) -> None:
    result = _run("--layout", "nvlm-d", "--size", "bench", "-o", str(tmp_path / "x"))
    assert result.exit_code == 2 and "internvl" in result.output
    assert not (tmp_path / "x").exists()


def test_greedy_tokens_depend_on_the_input(tmp_path: Path) -> None:
    """Later parity tests compare generated tokens, so logits must not be flat."""
    assert _run("--layout", "nvlm-d", "-o", str(tmp_path / "m")).exit_code == 0
    model = load_checkpoint(tmp_path / "m")
    image = [model.image_token_id] * 256
    prompts = [[11, 12, 13, *image, 14], [40, 41, 42, *image, 43], [11, 12, 13, *image, 99]]
    generator = torch.Generator().manual_seed(0)
    tiles = [torch.randn(1, 3, 448, 448, generator=generator) for _ in range(2)]
    with torch.no_grad():
        greedy = {
            (p, t): int(model(torch.tensor([prompts[p]]), tiles[t])[0, -1].argmax())
            for p in range(3)
            for t in range(2)
        }
    assert len(set(greedy.values())) >= 3
    assert any(greedy[(p, 0)] != greedy[(p, 1)] for p in range(3))  # the image changes the answer


def test_bench_geometry_is_internvl2_1b() -> None:
    config = tiny_config("bench", "internvl", vocab_size=1000, image_token_id=999, eos_id=995)
    assert config.llm_config["vocab_size"] == 151655
    with torch.device("meta"):
        model = build_model(config)
    vit = sum(p.numel() for p in model.vision.vit.parameters())
    llm = sum(p.numel() for p in model.language_model.parameters())
    assert 0.29e9 < vit < 0.32e9  # InternViT-300M
    assert 0.60e9 < llm < 0.66e9  # Qwen2-0.5B body + untied 151655-row head
    assert model.language_model.model.layers[0].self_attn.k_proj.weight.shape == (128, 896)


def test_3b_geometry_is_qwen2_5_3b_with_internvit_300m() -> None:
    config = tiny_config("3b", "internvl", vocab_size=1000, image_token_id=999, eos_id=995)
    with torch.device("meta"):
        model = build_model(config)
    vit = sum(p.numel() for p in model.vision.vit.parameters())
    llm = sum(p.numel() for p in model.language_model.parameters())  # tied head counted once
    embedding = model.language_model.model.embed_tokens.weight
    assert 0.29e9 < vit < 0.32e9
    assert llm == 3_085_938_688  # Qwen2.5-3B: 3.09B parameters, 2.77B without the embedding
    assert llm - embedding.numel() == 2_774_773_760
    assert model.language_model.lm_head.weight is embedding
    assert model.language_model.model.layers[0].self_attn.k_proj.weight.shape == (256, 2048)


def test_layers_sets_the_decoder_depth_at_the_same_width(tmp_path: Path) -> None:
    result = _run("--layout", "internvl", "-o", str(tmp_path / "deep"), "--layers", "5")
    assert result.exit_code == 0, result.output
    assert "5 decoder layers" in result.output
    deep = load_checkpoint(tmp_path / "deep")
    assert len(deep.language_model.model.layers) == 5
    default = tiny_config("tiny", "internvl", vocab_size=1000, image_token_id=999, eos_id=995)
    assert deep.config.llm_hidden_size == default.llm_hidden_size
    assert deep.config.vision == default.vision
