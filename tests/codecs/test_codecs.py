"""Tests for the mask codecs (pca, dct, identity, autoencoder): contracts, references, save/load, errors."""
import numpy as np
import pytest
import scipy.fft
import torch

import istr
from istr.codecs import NotFittedError
from istr.codecs.autoencoder import augment_grids
from istr.codecs.dct import zigzag_order
from set_utils import blobs

M_SMALL = 12


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a >= 0.5, b >= 0.5
    return float(((a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1).clamp_min(1)).mean())


AE_SMALL = {"base_channels": 4, "max_channels": 8, "bottleneck_size": 3, "depth": 1, "groups": 2}
AE_SMALL_FIT = {"epochs": 2, "batch_size": 16, "progress": False}

# name -> (constructor kwargs, fit kwargs); built for M=M_SMALL, l=10
CODEC_CASES = {
    "pca": ({}, {}),
    "pca_whiten_logit": ({"whiten": True, "logit_space": True}, {}),
    "dct": ({}, {}),
    "identity": ({}, {}),
    "autoencoder": (AE_SMALL, AE_SMALL_FIT),
}


def _make(case: str, m: int = M_SMALL, dim: int = 10) -> istr.MaskCodec:
    kwargs, _ = CODEC_CASES[case]
    name = "pca" if case.startswith("pca") else case
    if name == "identity":
        return istr.create_codec(name, mask_size=m, **kwargs)
    return istr.create_codec(name, mask_size=m, dim=dim, **kwargs)


@pytest.fixture(scope="module")
def fitted() -> dict[str, istr.MaskCodec]:
    data = blobs(48, M_SMALL)
    return {case: _make(case).fit(data, **CODEC_CASES[case][1]) for case in CODEC_CASES}


# ------------------------------------------------------------------------------------------------ contracts
@pytest.mark.parametrize("case", list(CODEC_CASES))
def test_shapes_dtypes_devices(case, fitted):
    codec = fitted[case]
    grids = blobs(5, M_SMALL, seed=1)
    z = codec.encode(grids)
    assert z.shape == (5, codec.dim) and z.dtype == torch.float32 and z.device == grids.device
    out = codec.decode(z)
    assert out.shape == (5, M_SMALL, M_SMALL) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    torch.testing.assert_close(codec(grids), out)
    torch.testing.assert_close(codec.encode(grids[:, None]), z)  # [N, 1, M, M] accepted
    torch.testing.assert_close(codec.encode((grids >= 0.5).to(torch.uint8)), codec.encode((grids >= 0.5).float()))
    # empty batches give empty results
    assert codec.encode(grids[:0]).shape == (0, codec.dim)
    assert codec.decode(z[:0]).shape == (0, M_SMALL, M_SMALL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", list(CODEC_CASES))
def test_cuda_device(case, fitted):
    codec = fitted[case]
    grids = blobs(4, M_SMALL, seed=1)
    gpu = _make(case)
    gpu.load_state_dict(codec.state_dict())
    gpu = gpu.cuda()
    z = gpu.encode(grids.cuda())
    assert z.device.type == "cuda"
    torch.testing.assert_close(z.cpu(), codec.encode(grids), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="codec is on"):
        gpu.encode(grids)


def test_identity_round_trip_exact():
    codec = istr.create_codec("identity", mask_size=7)
    assert codec.dim == 49 and codec.is_fitted
    grids = torch.rand(6, 7, 7)
    assert torch.equal(codec.decode(codec.encode(grids)), grids)
    assert torch.equal(codec.encode(grids), grids.reshape(6, 49))
    with pytest.raises(ValueError, match="dim = mask_size"):
        istr.create_codec("identity", mask_size=7, dim=20)


# ------------------------------------------------------------------------------------------------ PCA
@pytest.mark.parametrize("logit_space", [False, True])
def test_pca_matches_numpy_svd(real_grids_28, logit_space):
    grids = real_grids_28["train"]
    dim = 40
    codec = istr.create_codec("pca", mask_size=28, dim=dim, logit_space=logit_space).fit(grids)
    x = grids.reshape(len(grids), -1).double().numpy()
    if logit_space:
        eps = codec.logit_eps
        x = np.log((eps + (1 - 2 * eps) * x) / (1 - eps - (1 - 2 * eps) * x))
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    ref = vt[:dim]
    comps = codec.components.double().numpy()
    signs = np.sign((comps * ref).sum(1))
    np.testing.assert_allclose(comps, ref * signs[:, None], atol=2e-4)
    np.testing.assert_allclose(codec.explained_variance.double().numpy(), s[:dim] ** 2 / (len(x) - 1), rtol=1e-4)
    np.testing.assert_allclose(codec.mean.double().numpy(), mean, atol=1e-5)
    val = real_grids_28["val"]
    y = val.reshape(len(val), -1).double().numpy()
    if logit_space:
        y = np.log((eps + (1 - 2 * eps) * y) / (1 - eps - (1 - 2 * eps) * y))
    rec = (y - mean) @ ref.T @ ref + mean
    rec = 1 / (1 + np.exp(-rec)) if logit_space else np.clip(rec, 0, 1)
    np.testing.assert_allclose(codec(val).reshape(len(val), -1).double().numpy(), rec, atol=2e-4)


def test_pca_whiten_gives_unit_variance_and_same_reconstruction(real_grids_28):
    grids = real_grids_28["train"]
    plain = istr.create_codec("pca", mask_size=28, dim=20).fit(grids)
    white = istr.create_codec("pca", mask_size=28, dim=20, whiten=True).fit(grids)
    z = white.encode(grids)
    torch.testing.assert_close(z.std(0), torch.ones(20), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(z.mean(0), torch.zeros(20), atol=1e-4, rtol=0)
    torch.testing.assert_close(white(grids), plain(grids), atol=1e-5, rtol=1e-5)


def test_pca_streaming_fit_equals_one_shot(real_grids_28):
    grids = real_grids_28["train"]
    one = istr.create_codec("pca", mask_size=28, dim=30, whiten=True).fit(grids)
    chunks = (grids[i : i + 77] for i in range(0, len(grids), 77))  # a generator of uneven chunks
    streamed = istr.create_codec("pca", mask_size=28, dim=30, whiten=True).fit(chunks)
    small_chunks = istr.create_codec("pca", mask_size=28, dim=30, whiten=True).fit(grids, chunk_size=50)
    for other in (streamed, small_chunks):
        torch.testing.assert_close(other.components, one.components, atol=1e-5, rtol=0)
        torch.testing.assert_close(other.explained_variance, one.explained_variance)
        torch.testing.assert_close(other.encode(grids), one.encode(grids), atol=1e-4, rtol=1e-4)


def test_pca_beats_dct_on_real_masks(real_grids_28):
    pca = istr.create_codec("pca", mask_size=28, dim=40).fit(real_grids_28["train"])
    dct = istr.create_codec("dct", mask_size=28, dim=40)
    val = real_grids_28["val"]
    assert _iou(pca(val), val) > 0.85 and _iou(pca(val), val) > _iou(dct(val), val) - 0.02


# ------------------------------------------------------------------------------------------------ DCT
def test_zigzag_order_matches_reference():
    order = zigzag_order(112)
    assert order[:10] == [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3), (1, 2), (2, 1), (3, 0)]
    assert order[253:256] == [(22, 0), (21, 1), (20, 2)]
    assert sorted(order) == [(r, c) for r in range(112) for c in range(112)]
    assert len(zigzag_order(5)) == 25 and zigzag_order(5)[-1] == (4, 4)


def test_dct_basis_orthonormal_and_equal_to_scipy():
    m, dim = 16, 50
    codec = istr.create_codec("dct", mask_size=m, dim=dim)
    basis = codec.basis.double()
    torch.testing.assert_close(basis @ basis.T, torch.eye(dim, dtype=torch.float64), atol=1e-6, rtol=0)
    full = istr.create_codec("dct", mask_size=m, dim=m * m).basis.double()
    torch.testing.assert_close(full.T @ full, torch.eye(m * m, dtype=torch.float64), atol=1e-6, rtol=0)
    grids = torch.rand(4, m, m)
    coeffs = scipy.fft.dctn(grids.double().numpy(), axes=(1, 2), norm="ortho")
    rows, cols = zip(*zigzag_order(m)[:dim])
    expected = coeffs[:, list(rows), list(cols)]
    np.testing.assert_allclose(codec.encode(grids).double().numpy(), expected, atol=1e-5)
    zero_filled = np.zeros_like(coeffs)
    zero_filled[:, list(rows), list(cols)] = expected
    recon = np.clip(scipy.fft.idctn(zero_filled, axes=(1, 2), norm="ortho"), 0, 1)
    np.testing.assert_allclose(codec.decode(codec.encode(grids)).double().numpy(), recon, atol=1e-5)
    full_codec = istr.create_codec("dct", mask_size=m, dim=m * m)
    torch.testing.assert_close(full_codec(grids), grids, atol=1e-5, rtol=0)  # all coefficients: lossless


# ------------------------------------------------------------------------------------------------ autoencoder
def test_autoencoder_architecture_for_any_size():
    for m, sizes in ((28, [14, 7]), (112, [56, 28, 14, 7]), (13, [7]), (5, [3]), (1, [1])):
        codec = istr.create_codec("autoencoder", mask_size=m, dim=min(16, m * m))
        assert codec.sizes == sizes
        z = torch.randn(2, codec.dim)
        codec.fitted.fill_(True)
        assert codec.decode(z).shape == (2, m, m)
        assert codec.encode(torch.rand(2, m, m)).shape == (2, codec.dim)
        assert not any(p.requires_grad for p in codec.parameters())


def test_autoencoder_fit_deterministic_frozen_and_standardized():
    data = blobs(40, M_SMALL)
    a = _make("autoencoder").fit(data, seed=3, **AE_SMALL_FIT)
    b = _make("autoencoder").fit(data, seed=3, **AE_SMALL_FIT)
    c = _make("autoencoder").fit(data, seed=4, **AE_SMALL_FIT)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.encode(data), c.encode(data))
    assert not any(p.requires_grad for p in a.parameters()) and not a.training
    assert a.is_fitted and len(a.fit_history) == AE_SMALL_FIT["epochs"]
    z = a.encode(data)
    torch.testing.assert_close(z.mean(0), torch.zeros(a.dim), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(a.dim), atol=1e-4, rtol=1e-4)
    # encodings do not depend on the batch (no batch statistics) nor on train/eval mode
    a.train()
    torch.testing.assert_close(torch.cat([a.encode(data[i : i + 1]) for i in range(5)]), z[:5], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="epochs"):
        _make("autoencoder").fit(data, epochs=0)
    with pytest.raises(ValueError, match="at least 2"):
        _make("autoencoder").fit(data[:1], progress=False)


def _border_max(x: torch.Tensor) -> torch.Tensor:
    """[N, M, M] -> [N, 4] largest value on each border row / column."""
    return torch.stack([x[:, 0].amax(1), x[:, -1].amax(1), x[:, :, 0].amax(1), x[:, :, -1].amax(1)], 1)


def test_augment_grids_dihedral_and_affine(real_grids_28):
    grids = real_grids_28["train"]
    flips = augment_grids(grids, torch.Generator().manual_seed(0))
    assert torch.equal(flips, augment_grids(grids, torch.Generator().manual_seed(0)))  # reproducible
    variants = [grids, grids.flip(-1), grids.flip(-2), grids.flip(-1).flip(-2)]
    variants += [v.transpose(-1, -2) for v in variants]
    matches = torch.stack([(flips == v).flatten(1).all(1) for v in variants]).any(0)
    assert matches.all()  # each output is an exact dihedral image of its input
    assert (flips != grids).flatten(1).any(1).float().mean() > 0.5
    warped = augment_grids(grids, torch.Generator().manual_seed(0), affine_prob=1.0)
    assert warped.shape == grids.shape and float(warped.min()) >= 0 and float(warped.max()) <= 1
    assert (warped - flips).abs().flatten(1).amax(1).gt(0.2).float().mean() > 0.5  # really deformed
    # re-cropped to the support's tight box: border statistics and fill stay close to real GT-box crops
    assert abs(float(_border_max(warped).mean()) - float(_border_max(grids).mean())) < 0.15
    assert abs(float(warped.mean()) - float(grids.mean())) < 0.05
    half = augment_grids(grids, torch.Generator().manual_seed(0), affine_prob=0.5)
    assert 0.3 < float((half == flips).flatten(1).all(1).float().mean()) < 0.7


def test_autoencoder_improves_with_training_on_real_masks(real_grids_28):
    train, val = real_grids_28["train"], real_grids_28["val"]
    kwargs = {"mask_size": 28, "dim": 32, "base_channels": 8, "max_channels": 32, "depth": 1}
    fit = {"batch_size": 32, "lr": 3e-3, "seed": 0, "progress": False}
    short = istr.create_codec("autoencoder", **kwargs).fit(train, epochs=1, **fit)
    long = istr.create_codec("autoencoder", **kwargs).fit(train, epochs=8, **fit)
    iou_short, iou_long = _iou(short(val), val), _iou(long(val), val)
    assert iou_long > iou_short + 0.03, (iou_short, iou_long)
    assert iou_long > 0.8, iou_long


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("case", list(CODEC_CASES))
def test_save_load_round_trip(case, fitted, tmp_path):
    codec = fitted[case]
    path = tmp_path / f"{case}.safetensors"
    codec.save(path)
    loaded = istr.load_codec(path, mask_size=M_SMALL, dim=codec.dim)
    assert type(loaded) is type(codec) and loaded.config() == codec.config() and loaded.is_fitted
    grids = blobs(6, M_SMALL, seed=5)
    assert torch.equal(loaded.encode(grids), codec.encode(grids))
    z = codec.encode(grids)
    assert torch.equal(loaded.decode(z), codec.decode(z))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_load_rejects_wrong_size_and_bad_files(fitted, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = tmp_path / "pca.safetensors"
    fitted["pca"].save(path)
    with pytest.raises(ValueError, match="mask_size=12, expected mask_size=28"):
        istr.load_codec(path, mask_size=28)
    with pytest.raises(ValueError, match="dim=10, expected dim=60"):
        istr.load_codec(path, dim=60)
    with pytest.raises(FileNotFoundError):
        istr.load_codec(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a codec file at all" * 10)
    with pytest.raises(ValueError, match="not a codec file"):
        istr.load_codec(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(plain))
    with pytest.raises(ValueError, match="not an istr codec"):
        istr.load_codec(plain)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    meta = {**{k: v for k, v in meta.items() if k != "checksums"}, "version": "1"}  # as written before checksums
    tensors = load_file(str(path))
    save_file(tensors, str(tmp_path / "legacy.safetensors"), metadata=meta)
    assert torch.equal(istr.load_codec(tmp_path / "legacy.safetensors").components, fitted["pca"].components)
    bad_shape = dict(tensors, components=torch.zeros(10, 7))
    save_file(bad_shape, str(tmp_path / "bad_shape.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="'components' has shape"):
        istr.load_codec(tmp_path / "bad_shape.safetensors")
    missing = {k: v for k, v in tensors.items() if k != "mean"}
    save_file(missing, str(tmp_path / "missing_tensor.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="missing \\['mean'\\]"):
        istr.load_codec(tmp_path / "missing_tensor.safetensors")


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("case", list(CODEC_CASES))
def test_decode_is_differentiable(case, fitted):
    codec = _make(case)
    codec.load_state_dict(fitted[case].state_dict())
    codec = codec.double()
    grids = blobs(2, M_SMALL, seed=2).double() * 0.8 + 0.1  # away from the [0, 1] clamp of linear codecs
    z = codec.encode(grids).detach()
    z.requires_grad_(True)

    def f(e):
        return codec.decode(e)[:, ::3, ::3]  # a subset of outputs keeps gradcheck fast

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-5)
    codec.decode(z).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ errors
def test_bad_inputs_raise_clear_errors(fitted):
    codec = fitted["pca"]
    with pytest.raises(ValueError, match=r"shape \[N, 12, 12\].*got \(3, 12, 13\)"):
        codec.encode(torch.zeros(3, 12, 13))
    with pytest.raises(ValueError, match=r"shape \[N, 12, 12\]"):
        codec.encode(torch.zeros(12, 12))
    with pytest.raises(TypeError, match="torch.Tensor"):
        codec.encode(np.zeros((2, 12, 12)))
    bad = torch.zeros(2, 12, 12)
    bad[0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode(bad)
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        codec.encode(torch.full((2, 12, 12), 2.0))
    with pytest.raises(ValueError, match=r"shape \[N, 10\].*got \(2, 9\)"):
        codec.decode(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="non-finite"):
        codec.decode(torch.tensor([[float("inf")] * 10]))
    with pytest.raises(TypeError, match="floating point"):
        codec.decode(torch.zeros(2, 10, dtype=torch.long))
    for name in ("pca", "dct", "autoencoder"):
        with pytest.raises(ValueError, match="cannot exceed mask_size"):
            istr.create_codec(name, mask_size=4, dim=17)
        with pytest.raises(ValueError, match=r"mask_size must be >= 1, got 0 \(int\)"):
            istr.create_codec(name, mask_size=0, dim=1)
        with pytest.raises(TypeError, match=r"dim must be an int.*got '4' \(str\)"):
            istr.create_codec(name, mask_size=8, dim="4")
    with pytest.raises(ValueError, match="base_channels"):
        istr.create_codec("autoencoder", base_channels=0)


@pytest.mark.parametrize("name", ["pca", "autoencoder"])
def test_encode_before_fit_raises(name):
    codec = istr.create_codec(name, mask_size=8, dim=4)
    assert not codec.is_fitted
    with pytest.raises(NotFittedError, match="must be fit"):
        codec.encode(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError):  # NotFittedError is a ValueError
        codec.decode(torch.zeros(1, 4))
    assert issubclass(NotFittedError, ValueError)
    with pytest.raises(ValueError, match="at least 2"):
        codec.fit(torch.zeros(1, 8, 8), **({"progress": False} if name == "autoencoder" else {}))


# ------------------------------------------------------------------------------------------------ benchmark script
def test_codec_benchmark_script_smoke(coco_pool_train_json, coco_pool_val_json, tmp_path):
    """benchmarks/codecs.py end to end on small slices of the pool; its window paste equals a full-image paste."""
    import importlib.util
    import json
    from pathlib import Path

    from pycocotools import mask as mask_utils

    from istr.ops import paste_masks

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "codecs.py"
    spec = importlib.util.spec_from_file_location("codec_benchmark", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    paths = {}
    # 25 fit images hold >= 100 masks: the script's pca_energy fits a plain PCA with l=100, which needs 100 masks
    for name, src, n_images in (("fit", coco_pool_train_json, 25), ("eval", coco_pool_val_json, 25)):
        data = json.loads(Path(src).read_text())
        data["images"] = data["images"][:n_images]
        keep = {img["id"] for img in data["images"]}
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    out = tmp_path / "results"
    report = bench.main(["--fit-json", str(paths["fit"]), "--eval-json", str(paths["eval"]), "--codecs",
                         "pca,identity,dct", "--dims", "10,30", "--mask-sizes", "16", "--out", str(out)])
    rows = {(r["codec"], r["dim"]): r for r in report["results"]}
    assert set(rows) == {("pca", 10), ("pca", 30), ("dct", 10), ("dct", 30), ("identity", 256)}
    assert rows[("identity", 256)]["mean_iou"] > 0.95 and rows[("identity", 256)]["oracle_ap"] > 0.9
    assert rows[("pca", 30)]["mean_iou"] > rows[("pca", 10)]["mean_iou"]
    assert {"codecs.json", "codecs.md"} <= {p.name for p in out.iterdir()}
    assert all((out / p).is_file() for p in report["plots"])
    assert "| identity | 16 | 256 |" in (out / "codecs.md").read_text()
    # the benchmark's per-box window paste gives the same pixels as paste_masks on the full image
    ev = bench.load_instances(str(paths["eval"]), [16], keep_rles=False)
    grids = ev["grids"][16][:8]
    rles = bench.paste_to_rles(grids, {**ev, "boxes": ev["boxes"][:8], "image_sizes": ev["image_sizes"][:8]})
    for grid, box, (h, w), rle in zip(grids, ev["boxes"][:8], ev["image_sizes"][:8], rles):
        full = paste_masks(grid[None], box[None], (h, w), threshold=0.5)[0].numpy()
        assert (mask_utils.decode(rle).astype(bool) == full).all()
