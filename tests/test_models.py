"""vision_models on CPU: shapes, gradients, sizes against torchvision, unpooling, skips, size errors,
overfitting one batch, feature taps and offline pretrained weights."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet18 as tv_resnet18, resnet34 as tv_resnet34, resnet50 as tv_resnet50
from torchvision.models import vgg as tv_vgg

from conftest import ROOT
from vision_models import MODELS, build_model, check_image_size, extract, segnet
from vision_models.unet import ResNet50Encoder

K = 5  # segmentation classes in the small tests


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batches of 2-4 small images gain little from intra-op threads, and on a busy 2-core machine
    spinning OpenMP threads made this file five times slower (about 180 s instead of 35 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (registry name, builder kwargs, input shape): every model at its smallest quick size, plus the variants.
VARIANTS = [
    ("vgg16", {"in_channels": 1}, (2, 1, 32, 32)),
    ("vgg16", {"in_channels": 3}, (2, 3, 32, 32)),
    ("resnet18", {"in_channels": 1}, (2, 1, 32, 32)),
    ("resnet34", {"in_channels": 3}, (2, 3, 32, 32)),
    ("resnet50", {"in_channels": 3}, (2, 3, 32, 32)),
    ("conv_vae", {"latent_dim": 8}, (2, 1, 28, 28)),
    ("conv_vae", {"in_channels": 3, "image_size": 32, "latent_dim": 8}, (2, 3, 32, 32)),
    ("segnet_vgg16", {"num_classes": K}, (2, 3, 32, 32)),
    ("unet_resnet50", {"num_classes": K}, (2, 3, 32, 32)),
    ("unet_resnet50", {"num_classes": K, "skip_concat": False}, (2, 3, 32, 32)),
    ("unet_resnet50", {"num_classes": K, "encoder_stop": "layer2"}, (2, 3, 32, 32)),
]


def variant_id(variant: tuple) -> str:
    name, kwargs, _ = variant
    return "-".join([name, *(f"{k}={v}" for k, v in kwargs.items())])


IDS = [variant_id(v) for v in VARIANTS]


def make(name: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, **kwargs)


def outputs(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def expected_shapes(name: str, kwargs: dict, shape: tuple) -> list[tuple]:
    batch, _, height, width = shape
    if name == "conv_vae":
        return [shape, (batch, kwargs["latent_dim"]), (batch, kwargs["latent_dim"])]
    if name in ("segnet_vgg16", "unet_resnet50"):
        return [(batch, K, height, width)]
    return [(batch, 10)]


def test_every_model_is_tested():
    assert {name for name, _, _ in VARIANTS} == set(MODELS)
    from vision_models import resnet

    assert set(resnet.DEPTHS) <= set(MODELS)  # the registry names every depth the module builds


def test_a_vae_process_never_imports_torchvision():
    """What a VAE study's driver and its trials import (torchvision costs a process 3.6 s, torch._dynamo included):
    the registry imports a model's module when it is looked up, the data sets torchvision where they read files."""
    code = ("import sys; import studies.runner, studies.vae_lr, trainables.vae, trainables.tune_io; "
            "from vision_models import build_model, check_image_size; check_image_size('conv_vae', 28, image_size=28);"
            "build_model('conv_vae', image_size=28); print(sorted(m for m in sys.modules if m.startswith('torchvision')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("name,kwargs,shape", VARIANTS, ids=IDS)
def test_shapes_finite_and_gradient_on_every_parameter(name, kwargs, shape):
    model = make(name, kwargs).train()
    result = outputs(model(torch.randn(shape)))
    assert [tuple(t.shape) for t in result] == expected_shapes(name, kwargs, shape)
    assert all(torch.isfinite(t).all() for t in result)
    # Random weights: a plain sum would give BatchNorm's inputs an exactly zero gradient.
    loss = sum((t * torch.randn_like(t)).sum() for t in result)
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, f"{pname} has a zero/bad gradient"


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid names are .*segnet_vgg16.*unet_resnet50"):
        build_model("vgg19")


# --- sizes against torchvision's references ---------------------------------------------------------------
def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_vgg16_conv_stack_matches_torchvision_vgg16_bn_features():
    reference = tv_vgg.make_layers(tv_vgg.cfgs["D"], batch_norm=True)  # what vgg16_bn().features is
    ours = build_model("vgg16").features
    assert abs(count(ours) - count(reference)) <= 0.02 * count(reference)
    ours.load_state_dict(reference.state_dict(), strict=True)
    segnet_features = build_model("segnet_vgg16").features
    segnet_features.load_state_dict(reference.state_dict(), strict=True)  # so ImageNet weights load


@pytest.mark.parametrize("name,reference", [("resnet18", tv_resnet18), ("resnet34", tv_resnet34),
                                            ("resnet50", tv_resnet50)])
def test_cifar_resnets_match_torchvision_within_2_percent(name, reference):
    ours, theirs = count(build_model(name)), count(reference(num_classes=10))
    assert abs(ours - theirs) <= 0.02 * theirs  # only the 3x3 stem differs


@pytest.mark.parametrize("stop,dropped", [("layer3", ("fc.", "layer4.")),
                                          ("layer2", ("fc.", "layer4.", "layer3."))])
def test_unet_encoder_loads_torchvision_resnet50_strict(stop, dropped):
    reference = tv_resnet50().state_dict()
    encoder = ResNet50Encoder(stop)
    kept = {key: value for key, value in reference.items() if key in encoder.state_dict()}
    encoder.load_state_dict(kept, strict=True)  # every encoder key exists in torchvision's ResNet50
    assert all(key.startswith(dropped) for key in set(reference) - set(kept))
    assert not any(key.startswith(dropped) for key in kept)
    assert torch.equal(encoder.layer2[0].conv2.weight, reference["layer2.0.conv2.weight"])


# --- SegNet's unpooling really uses the encoder's indices --------------------------------------------------
def test_unpool_puts_a_single_maximum_back_where_it_was():
    model = build_model("segnet_vgg16")
    pool, unpool = model.features[6], model.decoder[4].unpool  # first encoder pool, its mirrored unpool
    images = torch.zeros(1, 2, 4, 4)
    images[0, 0, 1, 2], images[0, 1, 3, 0] = 5.0, 7.0
    pooled, indices = pool(images)
    assert torch.equal(unpool(pooled, indices, output_size=images.shape[-2:]), images)


def test_decoder_blocks_unpool_with_their_mirrored_encoder_indices():
    model = make("segnet_vgg16", {"num_classes": K}).eval()
    pools = [i for i, layer in enumerate(model.features) if isinstance(layer, torch.nn.MaxPool2d)]
    seen_indices, unpooled = {}, {}
    for j, i in enumerate(pools):
        model.features[i].register_forward_hook(lambda m, a, out, j=j: seen_indices.__setitem__(j, out[1]))
    for b, block in enumerate(model.decoder):
        block.unpool.register_forward_hook(lambda m, args, out, b=b: unpooled.__setitem__(b, (args, out)))
    model(torch.randn(1, 3, 64, 64))
    for b in range(5):
        (values, indices, *_), out = unpooled[b]
        assert torch.equal(indices, seen_indices[4 - b])
        flat = out.flatten(2)
        placed = torch.zeros_like(flat, dtype=torch.bool).scatter_(2, indices.flatten(2), True)
        assert not flat[~placed].any()  # everything off the recorded argmax positions is zero
        assert torch.equal(flat.gather(2, indices.flatten(2)), values.flatten(2))


def test_segnet_channels_last_matches_contiguous():
    model = make("segnet_vgg16", {"num_classes": K}).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        got = model.to(memory_format=torch.channels_last)(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# --- U-Net skip connections -------------------------------------------------------------------------------
def test_skip_concat_false_drops_the_concatenations(monkeypatch):
    with_skips = make("unet_resnet50", {"num_classes": K})
    without = make("unet_resnet50", {"num_classes": K, "skip_concat": False})
    assert len(with_skips.decoder) == len(without.decoder) == 4  # same depth
    ins_with = [block.in_channels for block in with_skips.decoder]
    ins_without = [block.in_channels for block in without.decoder]
    assert ins_with == [1024 + 512, 256 + 256, 128 + 64, 64] and ins_without == [1024, 256, 128, 64]
    assert count(without.decoder) < count(with_skips.decoder)
    cats = []
    real_cat = torch.cat

    def counting_cat(tensors, *args, **kwargs):
        cats.append(len(tensors))
        return real_cat(tensors, *args, **kwargs)
    monkeypatch.setattr(torch, "cat", counting_cat)
    images = torch.randn(2, 3, 32, 32)
    assert with_skips(images).shape == without(images).shape == (2, K, 32, 32)
    assert cats == [2, 2, 2]  # three concatenations, all from the model with skips


# --- input sizes --------------------------------------------------------------------------------------------
def test_interface_message_for_a_bad_size_without_building(monkeypatch):
    monkeypatch.setattr(segnet.SegNet, "__init__", lambda *a, **kw: pytest.fail("check_image_size built a model"))
    with pytest.raises(ValueError) as info:
        check_image_size("segnet_vgg16", 70, num_classes=21, pretrained=False)
    assert str(info.value) == "segnet_vgg16 needs H and W multiples of 32; got 70x70, nearest valid 64x64"


@pytest.mark.parametrize("name,kwargs,size,nearest", [
    ("vgg16", {}, 28, "32x32"), ("resnet18", {}, 30, "32x32"), ("resnet50", {}, 36, "40x40"),
    ("conv_vae", {}, 30, "32x32"), ("segnet_vgg16", {}, 80, "96x96"), ("segnet_vgg16", {}, 20, "32x32"),
    ("unet_resnet50", {}, 40, "48x48"), ("unet_resnet50", {"encoder_stop": "layer2"}, 36, "40x40"),
])
def test_bad_size_names_the_nearest_valid_one(name, kwargs, size, nearest):
    message = f"got {size}x{size}, nearest valid {nearest}"
    with pytest.raises(ValueError, match=re.escape(message)):
        check_image_size(name, size, **kwargs)
    if name != "conv_vae":  # the VAE rejects a bad image_size when built, see below
        channels = kwargs.get("in_channels", 3)
        with pytest.raises(ValueError, match=re.escape(message)):
            build_model(name, **kwargs).eval()(torch.zeros(1, channels, size, size))


def test_vae_size_errors():
    with pytest.raises(ValueError, match=re.escape("got 30x30, nearest valid 32x32")):
        build_model("conv_vae", image_size=30)
    with pytest.raises(ValueError, match="built for 1x28x28 .* got 1x32x32"):
        build_model("conv_vae")(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="pass image_size=32"):
        check_image_size("conv_vae", 32, in_channels=1, image_size=28, latent_dim=16)
    check_image_size("conv_vae", 28, in_channels=1, image_size=28, latent_dim=16)  # as the VAE config calls it


def test_valid_sizes_pass_and_unknown_kwargs_fail_early():
    check_image_size("unet_resnet50", 256, num_classes=21, pretrained=False, skip_concat=True,
                     encoder_stop="layer3")  # as the segmentation config calls it
    check_image_size("unet_resnet50", (64, 96), encoder_stop="layer2")
    check_image_size("vgg16", 64, num_classes=10, in_channels=1)
    with pytest.raises(TypeError):
        check_image_size("vgg16", 32, skip_concat=True)
    with pytest.raises(ValueError, match="encoder_stop must be one of"):
        check_image_size("unet_resnet50", 64, encoder_stop="layer4")


# --- learning: each model overfits one small batch --------------------------------------------------------
def small_batch(name: str, kwargs: dict, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    segmentation = name in ("segnet_vgg16", "unet_resnet50")
    batch, channels, height, width = (2 if segmentation else 4, *shape[1:])
    if name == "conv_vae":
        images = (torch.rand(batch, channels, height, width, generator=gen) > 0.5).float()
        return images, images
    if segmentation:
        blocks = torch.randint(0, K, (batch, height // 8, width // 8), generator=gen)
        masks = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (B,H,W) 8x8 regions of one class
        colours = torch.randn(K, channels, generator=gen)
        noise = 0.3 * torch.randn(batch, channels, height, width, generator=gen)
        return colours[masks].permute(0, 3, 1, 2) + noise, masks
    return torch.randn(batch, channels, height, width, generator=gen), torch.arange(batch)


def loss_of(name: str, result, targets: torch.Tensor) -> torch.Tensor:
    if name == "conv_vae":
        recon_logits, mu, logvar = result
        recon = F.binary_cross_entropy_with_logits(recon_logits, targets, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (recon + kl) / targets.shape[0]
    return F.cross_entropy(result, targets)


# One variant per model, plus the U-Net without skips (the report compares it); the others cost time only.
FIRST_VARIANTS = {v[0]: v for v in reversed(VARIANTS)}  # reversed, so each model's first variant wins
OVERFIT = [*FIRST_VARIANTS.values(), ("unet_resnet50", {"num_classes": K, "skip_concat": False}, (2, 3, 32, 32))]


@pytest.mark.parametrize("name,kwargs,shape", OVERFIT, ids=[variant_id(v) for v in OVERFIT])
def test_overfits_one_small_batch(name, kwargs, shape):
    model = make(name, kwargs).train()
    images, targets = small_batch(name, kwargs, shape)
    lr = 3e-3 if name in ("segnet_vgg16", "unet_resnet50") else 1e-3  # 3e-3 halves the slowest (SegNet's) steps
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)  # fused: one pass over 30M params
    losses = []
    for _ in range(100):
        loss = loss_of(name, model(images), targets)
        losses.append(loss.item())
        if losses[-1] < losses[0] / 5:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] / 5, f"loss {losses[0]:.3f} -> {losses[-1]:.3f} after {len(losses)} steps"


# --- feature taps -------------------------------------------------------------------------------------------
def expected_taps(name: str, kwargs: dict, batch: int, size: int) -> dict[str, tuple]:
    if name == "conv_vae":
        return {"mu": (batch, kwargs["latent_dim"])}
    if name == "segnet_vgg16":
        widths = (512, 256, 128, 64, 64)
        return {"encoder_out": (batch, 512, size // 32, size // 32),
                **{f"decoder_block{i + 1}": (batch, w, size // 2 ** (4 - i), size // 2 ** (4 - i))
                   for i, w in enumerate(widths)}}
    if name == "unet_resnet50":
        stride, width = (8, 512) if kwargs.get("encoder_stop") == "layer2" else (16, 1024)
        return {"encoder_out": (batch, width, size // stride, size // stride),
                "decoder_mid": (batch, 128, size // 4, size // 4)}
    return {"logits": (batch, 10)}


@pytest.mark.parametrize("name,kwargs,shape", VARIANTS, ids=IDS)
def test_extract_returns_every_declared_tap(name, kwargs, shape):
    model = make(name, kwargs).train()
    images = torch.randn(shape)
    features = extract(model, images, list(model.TAPS))
    assert {tap: tuple(f.shape) for tap, f in features.items()} == expected_taps(name, kwargs, shape[0], shape[-1])
    assert model.training  # restored
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
    with torch.no_grad():
        direct = outputs(model.eval()(images))
    if name == "conv_vae":
        torch.testing.assert_close(features["mu"], direct[1])
    elif "logits" in features:
        torch.testing.assert_close(features["logits"], direct[0])
    with pytest.raises(ValueError, match="valid taps are"):
        extract(model, images, ["nope"])


# --- the VAE ------------------------------------------------------------------------------------------------
def test_vae_sample_and_eval_uses_the_mean():
    model = make("conv_vae", {"in_channels": 3, "image_size": 32})
    samples = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (5, 3, 32, 32) and samples.min() >= 0 and samples.max() <= 1
    images = torch.rand(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(images)[0], model(images)[0])
    recon_logits, mu, _ = model(images)
    torch.testing.assert_close(recon_logits, model.decode(mu))
    model.train()
    assert not torch.allclose(model(images)[0], model(images)[0])  # training samples z


# --- pretrained weights, offline ---------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty $TORCH_HOME and no network: torchvision's download fails as it does without a connection."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("network unreachable (test)")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def vgg16_bn_checkpoint() -> dict[str, torch.Tensor]:
    """vgg16_bn's keys: the ``features.*`` stack plus a stand-in for the (550 MB) classifier SegNet ignores."""
    features = tv_vgg.make_layers(tv_vgg.cfgs["D"], batch_norm=True).state_dict()
    return {f"features.{k}": v for k, v in features.items()} | {"classifier.6.bias": torch.zeros(1000)}


@pytest.mark.parametrize("name,filename,checkpoint,loaded", [
    ("segnet_vgg16", "vgg16_bn-6c64b313.pth", vgg16_bn_checkpoint, ("features.0.weight", "features.40.weight")),
    ("unet_resnet50", "resnet50-11ad3fa6.pth", lambda: tv_resnet50().state_dict(),
     ("encoder.conv1.weight", "encoder.layer3.5.conv3.weight")),
])
def test_pretrained_offline_names_the_file_that_then_loads(offline, name, filename, checkpoint, loaded):
    target = offline / "hub" / "checkpoints" / filename
    with pytest.raises(RuntimeError, match=re.escape(str(target))):
        build_model(name, pretrained=True)
    state = checkpoint()
    target.parent.mkdir(parents=True, exist_ok=True)  # torch.hub made it before trying to download
    torch.save(state, target)
    model = build_model(name, pretrained=True).state_dict()  # read from the placed file, no network
    for key in loaded:
        assert torch.equal(model[key], state[key.removeprefix("encoder.")])
