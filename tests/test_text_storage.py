"""How the latent cache stores text embeddings: compressed without loss (T5: its real tokens' rows only), one file
per distinct caption, read back by each clip's caption hash; caches of the older format are refused."""

import json
import os
import shutil

import pytest
import torch

import train_cosmos_lora as train
from conftest import (
    cache_clips,
    copy_cache,
    edit_cache_info,
    error_line,
    run_script,
    text_embed_files,
    train_args,
)
from cosmos_cache import (
    caption_hash,
    list_cached_clips,
    pack_text_embeds,
    unpack_text_embeds,
    verify_cache,
    write_text_embeds,
)
from cosmos_data import CachedClips
from cosmos_families import TEXT_MAX_LENGTH, detect_family, load_component

CAPTIONS = [
    "A worker's hands fit a bracket onto a bench.",
    "The camera pans slowly to the left while the right hand picks up a tool and places it in a box. The left hand "
    "steadies the box. Striped shapes move across a textured wall behind it.",
]


def bits(embeds):
    return embeds.contiguous().view(torch.int16)


def text_encoder(model):
    family = detect_family(model)
    tokenizer = load_component(model, "tokenizer", family=family)
    return family, tokenizer, load_component(model, "text_encoder", family=family)


def assert_rebuilt_bit_for_bit(embeds, rows):
    packed = pack_text_embeds(embeds)
    assert packed.rows == rows
    assert torch.equal(bits(unpack_text_embeds(packed, tuple(embeds.shape))), bits(embeds))
    return packed


def test_t5_padding_is_zero_and_its_real_rows_rebuild_the_embedding_bit_for_bit(tiny_model):
    family, tokenizer, encoder = text_encoder(tiny_model)
    embeds = family.encode_prompts(tokenizer, encoder, CAPTIONS, "cpu").to(torch.bfloat16)
    mask = tokenizer(CAPTIONS, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True).attention_mask
    for one, tokens in zip(embeds, [sum(row) for row in mask], strict=True):
        assert not one[tokens:].any() and one[tokens - 1].any()  # the pipeline zeroes every row past the tokens
        packed = assert_rebuilt_bit_for_bit(one, tokens)
        assert packed.nbytes < tokens * one.shape[1] * 2  # fewer bytes than the real rows alone


def test_predict25_padding_depends_on_the_caption_and_all_512_rows_rebuild_bit_for_bit(tiny_model_25):
    family, tokenizer, encoder = text_encoder(tiny_model_25)
    transformer = load_component(tiny_model_25, "transformer", family=family)
    full = family.encode_prompts(tokenizer, encoder, CAPTIONS, "cpu")
    with torch.no_grad():
        projected = transformer.crossattn_proj(full)
    # no attention mask: the padding rows are neither zero nor the same for two captions, so they must be stored
    last = projected[:, -1]
    assert last[0].any() and not torch.equal(last[0], last[1])
    for one in [*projected, *full]:
        assert_rebuilt_bit_for_bit(one.to(torch.bfloat16), TEXT_MAX_LENGTH)


def test_a_150_token_t5_caption_takes_at_most_a_quarter_of_a_reference_clips_latents(tmp_path):
    """The disk claim at the real shapes: T5 [512, 1024] with 150 real tokens (a 4-sentence caption) against the
    latents of one 61x256x448 clip, [16, 16, 32, 56] bf16; the real rows are a normal stand-in for T5's output."""
    latent_bytes = 16 * 16 * 32 * 56 * 2
    embeds = torch.zeros(512, 1024)
    embeds[:150] = torch.randn(150, 1024, generator=torch.Generator().manual_seed(0))
    embeds = embeds.to(torch.bfloat16)
    path = str(tmp_path / "ab" / "caption.safetensors")
    write_text_embeds(path, embeds, "caption")
    assert embeds.numel() * 2 > latent_bytes  # the padded tensor of format 2 is larger than the latents
    assert os.path.getsize(path) <= latent_bytes / 4


def test_a_file_that_would_not_rebuild_the_embedding_is_not_written(tmp_path, monkeypatch):
    import cosmos_cache

    embeds = torch.randn(512, 32).to(torch.bfloat16)
    monkeypatch.setattr(cosmos_cache, "unpack_text_embeds", lambda packed, shape: torch.zeros(shape).bfloat16())
    path = tmp_path / "ab" / "x.safetensors"
    with pytest.raises(RuntimeError, match="does not rebuild the embedding bit for bit"):
        write_text_embeds(str(path), embeds, "x")
    assert not path.exists()


def test_one_embedding_per_distinct_caption_and_each_clip_reads_its_own(tiny_model_25, clips, tmp_path):
    """Three videos, two sharing a caption: two text files; every clip's training item holds its key's caption."""
    videos = tmp_path / "videos"
    videos.mkdir()
    keys = clips["keys"][:3]
    captions = dict(zip(keys, [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]], strict=True))
    for key in keys:
        shutil.copy(os.path.join(clips["videos"], key + ".mp4"), videos)
        (videos / f"{key}.txt").write_text(captions[key])
    cache = str(tmp_path / "cache")
    assert cache_clips(tiny_model_25, cache, "--video_dir", videos, "--clip_stride_seconds", "1") == 0
    files = text_embed_files(cache)
    assert sorted(os.path.basename(f) for f in files) == sorted(f"{caption_hash(c)}.safetensors" for c in CAPTIONS)
    family, tokenizer, encoder = text_encoder(tiny_model_25)
    transformer = load_component(tiny_model_25, "transformer", family=family)
    with torch.no_grad():
        expected = {
            c: transformer.crossattn_proj(family.encode_prompts(tokenizer, encoder, [c], "cpu"))[0] for c in CAPTIONS
        }
    dataset = CachedClips(list_cached_clips(cache))
    assert len(dataset) == 6
    for index, clip in enumerate(dataset.clips):
        stored = dataset[index]["prompt_embeds"]
        assert torch.equal(stored, expected[captions[clip.key]].to(torch.bfloat16).float()), clip.key
    stats, problems = verify_cache(cache)
    assert not problems and stats["captions"] == 2
    assert stats["text_bytes"] == sum(os.path.getsize(f) for f in files)
    data = bytearray(open(files[0], "rb").read())
    data[-100] ^= 0xFF  # one flipped byte inside a compressed plane: zstd's checksum catches it
    open(files[0], "wb").write(bytes(data))
    problems = verify_cache(cache)[1]
    assert len(problems) == 1 and problems[0].startswith(f"{files[0]}: unreadable"), problems


def test_a_format_2_cache_is_refused_in_one_line(tiny_model, one_clip_cache, tmp_path):
    cache = copy_cache(one_clip_cache, tmp_path / "cache")
    edit_cache_info(cache, format_version=2)
    with pytest.raises(ValueError, match="is a format-2 cache, not format 3: re-cache it"):
        train.main(train_args(tiny_model, cache, tmp_path / "out", "--max_train_steps", 1))


def test_bench_text_storage_measures_the_options_and_refuses_a_missing_model(tiny_model_25, tmp_path):
    out = tmp_path / "result.json"
    script = "benchmarks/bench_text_storage.py"
    result = run_script(script, "--pretrained_model_name_or_path", tiny_model_25, "--out", out, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.load(open(out))["summary"]
    # Predict2.5 pads with non-zero rows: its real rows alone are not exact, the cache's format is
    assert summary["cache"]["exact"] and not summary["real_rows"]["exact"] and summary["pad_tail_error_mean"] > 0
    assert summary["cache"]["bytes_per_caption"] < summary["padded"]["bytes_per_caption"]
    missing = run_script(script, "--pretrained_model_name_or_path", tmp_path / "nope", timeout=120)
    assert "does not exist" in error_line(missing)
