import warnings

import pytest
import torch

import cosmos_vae

# Float64 is slow on CPU, so the clips are 32x48: the spatial path is per frame, the frame counts are what matters.
# Frames 1, 5, 9, 17 are 1, 2, 3, 5 latent frames: no temporal downsample, one chunk after the first, several.
NUM_FRAMES = [1, 5, 9, 17]


@pytest.fixture(scope="module")
def vae64(tiny_model):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(tiny_model, subfolder="vae").double().eval()


def relative_error(ours, theirs):
    return ((ours - theirs).norm() / theirs.norm()).item()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("num_frames", NUM_FRAMES)
@torch.no_grad()
def test_whole_clip_encode_equals_chunked_encode_in_float64(vae64, num_frames, batch):
    assert cosmos_vae.whole_clip_unsupported(vae64) is None
    x = torch.rand(batch, 3, num_frames, 32, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    chunked = vae64.encode(x * 2 - 1).latent_dist.mean
    whole = cosmos_vae.encode_whole_clip(vae64, x * 2 - 1)
    assert whole.shape == chunked.shape == (batch, 16, (num_frames - 1) // 4 + 1, 4, 6)
    assert relative_error(whole, chunked) < 1e-10


@torch.no_grad()
def test_channels_last_weights_change_no_encoded_value(tiny_model):
    """cache_latents.py on a GPU stores the VAE's convolution weights channels-last (one memory format through the
    whole encode): the same latents as the channels-first VAE, in float64, from channels-last input."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(tiny_model, subfolder="vae").double().eval()
    x = torch.rand(2, 3, 9, 32, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = cosmos_vae.encode_whole_clip(vae, x)
    cosmos_vae.convolutions_channels_last(vae)
    convolutions = [m for m in vae.encoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert {m.weight.ndim for m in convolutions} == {4, 5}  # both kinds are there and converted
    for m in convolutions:
        layout = torch.channels_last_3d if m.weight.ndim == 5 else torch.channels_last
        assert m.weight.is_contiguous(memory_format=layout)
    assert sum(not m.weight.is_contiguous() for m in convolutions) > len(convolutions) // 2  # 1x1 kernels are both
    got = cosmos_vae.encode_whole_clip(vae, x.contiguous(memory_format=torch.channels_last_3d))
    assert relative_error(got, expected) < 1e-12


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("num_frames", NUM_FRAMES)
@torch.no_grad()
def test_whole_clip_decode_equals_chunked_decode_in_float64(vae64, num_frames, batch):
    z = torch.randn(batch, 16, (num_frames - 1) // 4 + 1, 4, 6, dtype=torch.float64)
    chunked = vae64.decode(z).sample
    whole = cosmos_vae.decode_whole_clip(vae64, z)
    assert whole.shape == chunked.shape == (batch, 3, num_frames, 32, 48)
    assert (chunked.abs() < 1).float().mean() > 0.9  # the comparison is not hidden by the output clamp
    assert relative_error(whole, chunked) < 1e-10


def test_whole_clip_encode_needs_4k_plus_1_frames(vae64):
    with pytest.raises(ValueError, match="4k\\+1 frames, got 6"):
        cosmos_vae.encode_whole_clip(vae64, torch.zeros(1, 3, 6, 32, 48, dtype=torch.float64))


@pytest.mark.parametrize(
    "config, reason",
    [
        (dict(is_residual=True), "is_residual=True"),
        (dict(patch_size=2, in_channels=12, out_channels=12), "patch_size=2"),
    ],
)
def test_a_vae_layout_not_proven_is_refused(config, reason):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1, **config)
    assert reason in cosmos_vae.whole_clip_unsupported(vae)


@torch.no_grad()
def test_the_compiled_whole_clip_decode_equals_the_eager_one(tiny_model, monkeypatch):
    """sample.py --compile decodes with cosmos_vae.compiled_decode_whole_clip (on GPU). Here it is traced by dynamo
    into one graph and run by AOTAutograd without inductor's code generation (a minute of C++ builds on 2 cores)."""
    import functools

    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(tiny_model, subfolder="vae").eval()
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    eager = cosmos_vae.decode_whole_clip(vae, z)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager", fullgraph=True))
    cosmos_vae.compiled_decode_whole_clip.cache_clear()
    try:
        compiled = cosmos_vae.compiled_decode_whole_clip()(vae, z)
    finally:
        cosmos_vae.compiled_decode_whole_clip.cache_clear()
    assert compiled.shape == (1, 3, 9, 32, 48)
    assert relative_error(compiled, eager) < 1e-5


@torch.no_grad()
def test_a_whole_clip_decode_out_of_gpu_memory_warns_and_leaves_the_decode_to_the_chunked_one(vae64, monkeypatch):
    z = torch.randn(3, 16, 3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    one_call = cosmos_vae.decode_whole_clip(vae64, z)
    two_at_a_time = cosmos_vae.decode_whole_clip_if_it_runs(vae64, z, videos=2, compiled=False)
    torch.testing.assert_close(two_at_a_time, one_call, rtol=0, atol=0)

    tries = []

    def out_of_memory(vae, z):
        tries.append(z.shape)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB.")

    monkeypatch.setattr(cosmos_vae, "decode_whole_clip", out_of_memory)
    monkeypatch.setattr(cosmos_vae, "TOO_LARGE_SHAPES", set())
    with pytest.warns(UserWarning, match=r"latents \[1, 16, 3, 4, 6\] ran out of GPU memory: decoding frame by frame"):
        assert cosmos_vae.decode_whole_clip_if_it_runs(vae64, z, videos=1, compiled=False) is None
    # the next video of that shape goes straight to the frame-by-frame decode, without a warning or a try
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cosmos_vae.whole_clip_decodes_that_fit(vae64, z[:1]) == 0
    assert len(tries) == 1


def test_a_whole_clip_decode_counted_larger_than_the_free_gpu_memory_is_not_tried(tiny_model, monkeypatch):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(tiny_model, subfolder="vae").to(torch.bfloat16)
    z = torch.randn(3, 16, 5, 4, 6, dtype=torch.bfloat16)
    decode = cosmos_vae.decode_whole_clip
    needed = {
        n: cosmos_vae.MEMORY_MARGIN * cosmos_vae.whole_clip_peak_bytes(vae, decode, (n, 16, 5, 4, 6)) for n in (1, 2)
    }
    monkeypatch.setattr(cosmos_vae, "TOO_LARGE_SHAPES", set())
    free = {"bytes": needed[2]}
    monkeypatch.setattr(cosmos_vae, "free_gpu_bytes", lambda device: free["bytes"])

    assert cosmos_vae.whole_clip_decodes_that_fit(vae, z) == 2  # 2 of the 3 videos per call
    free["bytes"] = needed[1] * 0.99
    with pytest.warns(UserWarning, match=r"latents \[1, 16, 5, 4, 6\] needs about .* GiB of GPU memory and .* free"):
        assert cosmos_vae.whole_clip_decodes_that_fit(vae, z) == 0
    free["bytes"] = needed[2] * 2  # refused once, that shape stays frame by frame, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cosmos_vae.whole_clip_decodes_that_fit(vae, z) == 0


def test_whole_clips_that_fit_is_the_most_clips_whose_counted_peak_fits(tiny_model):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(tiny_model, subfolder="vae")
    clip = (3, 9, 32, 48)
    encode = cosmos_vae.encode_whole_clip
    peak = {n: cosmos_vae.MEMORY_MARGIN * cosmos_vae.whole_clip_peak_bytes(vae, encode, (n, *clip)) for n in (1, 2, 3)}
    assert peak[1] < peak[2] < peak[3]
    assert cosmos_vae.whole_clips_that_fit(vae, encode, clip, 3, free=peak[3]) == 3
    assert cosmos_vae.whole_clips_that_fit(vae, encode, clip, 3, free=peak[3] - 1) == 2
    assert cosmos_vae.whole_clips_that_fit(vae, encode, clip, 2, free=10 * peak[3]) == 2  # never more than asked
    assert cosmos_vae.whole_clips_that_fit(vae, encode, clip, 3, free=peak[1] - 1) == 0


@torch.no_grad()
@pytest.mark.parametrize("function", ["encode_whole_clip", "decode_whole_clip"])
def test_the_peak_counted_on_a_meta_copy_of_the_vae_is_the_peak_of_the_real_pass(tiny_model, function):
    from diffusers import AutoencoderKLWan

    function = getattr(cosmos_vae, function)
    vae = AutoencoderKLWan.from_pretrained(tiny_model, subfolder="vae").to(torch.bfloat16)
    x = torch.randn(1, 3, 17, 32, 48) if function is cosmos_vae.encode_whole_clip else torch.randn(1, 16, 5, 4, 6)
    x = x.to(torch.bfloat16)
    real = cosmos_vae.counted_peak_bytes(function, vae, x)  # counted while the pass really runs on the CPU
    assert real > 3 * 17 * 32 * 48 * 2  # more than one clip in bf16
    assert cosmos_vae.whole_clip_peak_bytes(vae, function, x.shape) == real
    assert cosmos_vae.whole_clip_peak_bytes(vae, function, (2, *x.shape[1:])) > real


def test_live_bytes_counts_storages_while_a_tensor_holds_them():
    counter = cosmos_vae.LiveBytes()
    with counter:
        a = torch.empty(256, device="meta")  # 1 KiB
        b = a * 2
        view = b.view(16, 16)  # b's storage: no new bytes
        del a
        c = b + 1
        assert counter.now == 2048
        del b
        assert counter.now == 2048  # the view keeps b's storage
        del view
        assert counter.now == 1024
        kept = [c * k for k in range(3)]  # c and three more at once: the peak
        del c, kept
    assert (counter.peak, counter.now) == (4096, 0)
