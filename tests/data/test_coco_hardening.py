"""Hardening of the data and file paths: degenerate PCA fits, the one COCO annotation reader, image modes, predict
on PIL images, results-json evaluation, pretrained weights offline, and file permissions."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import istr
from istr.data import CocoInstances, load_image, pil_to_tensor, read_coco_annotations
from istr.engine.fit_codec import coco_mask_grids
from set_utils import blobs

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ 1. PCA
@pytest.mark.parametrize("kwargs, what", [({"whiten": True, "logit_space": True}, "whitened PCA"), ({}, "PCA")])
def test_pca_refuses_fewer_masks_than_dim(kwargs, what):
    codec = istr.create_codec("pca", mask_size=28, dim=60, **kwargs)
    with pytest.raises(ValueError, match=rf"^{what} with dim l=60 needs at least 60 masks.*got 5 masks"):
        codec.fit(blobs(5, 28))
    assert not codec.is_fitted


@pytest.mark.parametrize("kwargs", [{}, {"whiten": True}, {"whiten": True, "logit_space": True}])
def test_degenerate_pca_warns_and_stays_bounded(kwargs):
    unseen = blobs(50, 28, seed=3)
    few = blobs(5, 28).repeat(14, 1, 1)  # 70 masks, 5 distinct: 56 of 60 components carry no variance
    with pytest.warns(UserWarning, match=r"70 masks: 56 of 60 components have near-zero variance"):
        codec = istr.create_codec("pca", mask_size=28, dim=60, **kwargs).fit(few)
    assert float(codec.encode(unseen).abs().max()) < 500  # was up to 2.6e7 whitened
    torch.testing.assert_close(codec.decode(codec.encode(few)), codec(few))


@pytest.mark.parametrize("kwargs", [{}, {"whiten": True, "logit_space": True}])
def test_pca_on_identical_masks_is_refused(kwargs):
    same = blobs(1, 28).repeat(70, 1, 1)  # identical grids: no component has any variance
    codec = istr.create_codec("pca", mask_size=28, dim=60, **kwargs)
    with pytest.raises(ValueError, match=r"PCA fit on 70 masks: the masks are \(nearly\) identical"):
        codec.fit(same)
    assert not codec.is_fitted


def test_healthy_pca_fit_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codec = istr.create_codec("pca", mask_size=12, dim=10, whiten=True).fit(blobs(200, 12))
    z = codec.encode(blobs(200, 12))
    torch.testing.assert_close(z.std(0), torch.ones(10), atol=1e-3, rtol=1e-3)  # exact whitening, no floor


# ------------------------------------------------------------------------------------------------ 3. the reader
def _rle(h: int, w: int, y0: int, y1: int, x0: int, x1: int, compressed: bool = True) -> dict:
    a = np.zeros((h, w), np.uint8, order="F")
    a[y0:y1, x0:x1] = 1
    if compressed:
        rle = mask_utils.encode(a)
        return {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    flat, counts, last, run = a.flatten(order="F"), [], 0, 0
    for v in flat:
        if v != last:
            counts.append(run)
            last, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [h, w], "counts": counts}


def _square(x: float, y: float, s: float) -> list[list[float]]:
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


@pytest.fixture()
def messy_coco(tmp_path: Path) -> Path:
    """One 40 x 50 image with one annotation per case of the drop policy."""
    h, w = 40, 50
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(tmp_path / "a.png")
    anns = [
        {"segmentation": _square(5, 5, 10), "bbox": [5, 5, 10, 10]},  # fine
        {"segmentation": [[20, 20, 30, 30]], "bbox": [20, 20, 10, 10]},  # a 2-point polygon: invalid segmentation
        {"segmentation": _square(20, 20, 10), "bbox": [20, 20, 0, 10]},  # zero-width box: degenerate
        {"segmentation": _rle(h, w, 10, 20, 30, 45)},  # compressed RLE without bbox: box from the mask
        {"segmentation": _rle(h, w, 25, 35, 2, 8, compressed=False)},  # uncompressed RLE without bbox
        {"segmentation": _square(42, 32, 10)},  # polygon without bbox, partly outside: box clipped
        {"segmentation": _rle(h + 1, w, 0, 5, 0, 5), "bbox": [0, 0, 5, 5]},  # RLE of another size: invalid
        {"segmentation": [], "bbox": [1, 1, 5, 5]},  # empty segmentation: invalid
        {"segmentation": [[2, 2, 20, 20, 38, 38]], "bbox": [2, 2, 36, 36]},  # collinear: rasterises empty
        {"segmentation": _square(1, 1, 30), "bbox": [1, 1, 30, 30], "iscrowd": 1},  # crowd
    ]
    for i, ann in enumerate(anns, 1):
        ann.update(id=i, image_id=1, category_id=3)
        ann.setdefault("iscrowd", 0)
    data = {"images": [{"id": 1, "file_name": "a.png", "height": h, "width": w}], "annotations": anns,
            "categories": [{"id": 3, "name": "thing"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_dataset_and_codec_fitting_share_one_reader(messy_coco):
    ds = CocoInstances(messy_coco.parent, messy_coco)
    grids, stats = coco_mask_grids(messy_coco, 14, return_stats=True)
    shared = ("annotations_total", "crowd_annotations", "boxes_from_segmentation", "clipped_boxes",
              "dropped_degenerate_boxes", "dropped_invalid_segmentations", "instances")
    assert {k: ds.stats[k] for k in shared} == {k: stats[k] for k in shared} == {
        "annotations_total": 10, "crowd_annotations": 1, "boxes_from_segmentation": 3, "clipped_boxes": 1,
        "dropped_degenerate_boxes": 1, "dropped_invalid_segmentations": 3, "instances": 5}
    image, target = ds[0]
    assert ds.stats["dropped_empty_masks"] == stats["dropped_empty_masks"] == 1  # the collinear polygon
    assert len(target["boxes"]) == len(grids) == stats["masks"] == 4
    boxes = target["boxes"].tolist()
    assert boxes[1] == [30, 10, 45, 20]  # compressed RLE without bbox: its mask's bounds
    assert boxes[2] == [2, 25, 8, 35]  # uncompressed RLE without bbox
    assert boxes[3] == [42, 32, 50, 40]  # polygon without bbox: its bounds, clipped to the 50 x 40 image
    for k, box in enumerate(boxes):  # every kept mask lies inside its box and is not empty
        x0, y0, x1, y1 = (int(v) for v in box)
        assert target["masks"][k].sum() == target["masks"][k, y0:y1, x0:x1].sum() > 0
    assert float(grids.amax(dim=(1, 2)).min()) > 0.5  # no all-empty grid reaches the codec


def test_reader_policy_and_errors(messy_coco):
    coco = istr.data.load_coco_json(messy_coco)
    images, stats = read_coco_annotations(coco, include_crowd=True)
    assert stats["instances"] == 6 and [a["iscrowd"] for a in images[0]["anns"]][-1] == 1
    _, strict = read_coco_annotations(coco, min_box_size=11)
    assert strict["dropped_degenerate_boxes"] == 5 and strict["instances"] == 1  # only the 36 px box is left
    with pytest.raises(ValueError, match="min_box_size"):
        read_coco_annotations(coco, min_box_size=-1)
    data = json.loads(messy_coco.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["id"] == 2]  # only the 2-point polygon
    only_bad = messy_coco.with_name("bad.json")
    only_bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"no usable annotations.*1 dropped: invalid segmentation"):
        coco_mask_grids(only_bad, 14)


def test_a_box_that_misses_its_mask_is_dropped_and_counted(tmp_path, caplog):
    """A GT box covering no pixel of its mask would give an empty box-cropped target: the dataset and codec fitting
    drop it, count it and say so (one policy, mask_inside_box)."""
    Image.fromarray(np.full((40, 50, 3), 100, np.uint8)).save(tmp_path / "a.png")
    anns = [{"segmentation": _square(5, 5, 10), "bbox": [5, 5, 10, 10]},  # fine
            {"segmentation": _square(5, 25, 8), "bbox": [35, 2, 10, 10]},  # the box lies away from the mask
            {"segmentation": _square(20, 20, 10), "bbox": [29.5, 29.5, 5, 5]}]  # touches one mask pixel: kept
    for i, ann in enumerate(anns, 1):
        ann.update(id=i, image_id=1, category_id=3, iscrowd=0)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}],
                                "annotations": anns, "categories": [{"id": 3, "name": "thing"}]}))
    ds = CocoInstances(tmp_path, path)
    with caplog.at_level("WARNING"):
        _, target = ds[0]
    assert len(target["boxes"]) == 2 and ds.stats["dropped_box_misses_mask"] == 1
    assert "annotation 2 of image 1: its box [35.0, 2.0, 45.0, 12.0] covers no pixel of its mask" in caplog.text
    grids, stats = coco_mask_grids(path, 14, return_stats=True)
    assert stats["dropped_box_misses_mask"] == 1 and len(grids) == stats["masks"] == 2
    assert float(grids.amax(dim=(1, 2)).min()) > 0  # no all-empty grid reaches the codec
    assert "1 dropped: box does not cover its mask" in istr.data.describe_stats(stats)


# ------------------------------------------------------------------------------------------------ 4. image modes
def test_load_image_16_bit_and_other_modes(tmp_path):
    values = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    Image.fromarray(values).save(tmp_path / "g16.png")  # I;16
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "gI.tif")  # I
    Image.fromarray(values.astype(np.float32) / 65535).save(tmp_path / "gF.tif")  # F in [0, 1]
    want = torch.from_numpy(values / 65535.0).float()
    for name in ("g16.png", "gI.tif", "gF.tif"):
        image = load_image(tmp_path / name)
        assert image.shape == (3, 3, 4) and image.dtype == torch.float32, name
        torch.testing.assert_close(image[0], want, atol=1e-6, rtol=0)  # not saturated: 55000 -> 0.839
        assert torch.equal(image[0], image[2])
    Image.fromarray(values.astype(np.float32) / 65535 * 255).save(tmp_path / "gF255.tif")  # F in [0, 255]
    torch.testing.assert_close(load_image(tmp_path / "gF255.tif")[1], want, atol=1e-5, rtol=0)
    Image.fromarray(values.astype(np.int32) * 100).save(tmp_path / "big.tif")
    with pytest.raises(ValueError, match=r"big\.tif.*mode I.*\[0, 65535\]"):
        load_image(tmp_path / "big.tif")
    Image.fromarray(np.full((3, 4), 7.0, np.float32)).save(tmp_path / "f7.tif")
    assert torch.allclose(load_image(tmp_path / "f7.tif"), torch.full((3, 3, 4), 7 / 255))

    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    cases = {
        "LA": (Image.fromarray(np.stack([gray, np.full_like(gray, 9)], -1), "LA"), np.repeat(gray[..., None], 3, -1)),
        "P": (Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE), None),
        "CMYK": (Image.fromarray(rgb).convert("CMYK"), rgb),
        "1": (Image.fromarray(gray > 127), np.repeat(((gray > 127) * 255).astype(np.uint8)[..., None], 3, -1)),
        "RGBA": (Image.fromarray(np.concatenate([rgb, np.full_like(rgb[..., :1], 50)], -1), "RGBA"), rgb),
    }
    for mode, (pil, expected) in cases.items():
        path = tmp_path / f"m_{mode}.{'tif' if mode == 'CMYK' else 'png'}"
        pil.save(path)
        image = load_image(path)
        assert image.shape == (3, 3, 4) and 0 <= float(image.min()) and float(image.max()) <= 1, mode
        if expected is None:  # palette: the palette's colours
            expected = np.asarray(Image.open(path).convert("RGB"))
        torch.testing.assert_close(image, torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 255, msg=mode)
        torch.testing.assert_close(pil_to_tensor(Image.open(path)), image, msg=mode)
    with pytest.raises(TypeError, match="PIL"):
        pil_to_tensor(np.zeros((3, 4)))


# ------------------------------------------------------------------------------------------------ 5. predict
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    grids = (torch.rand(64, 14, 14, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    codec = istr.create_codec("pca", mask_size=14, dim=8).fit(grids)
    return istr.create_model("istr_tiny", num_classes=3, codec=codec, num_queries=4, num_stages=1, hidden_dim=32,
                             dynamic_dim=8, ffn_dim=32, num_heads=2, detections_per_image=5, min_size=32,
                             max_size=32, train_min_sizes=(32,))


def test_predict_accepts_pil_images_paths_and_tensors(tiny_model, tmp_path):
    from istr.engine.predict import predict

    rgb = np.random.default_rng(1).integers(0, 256, (30, 36, 3), dtype=np.uint8)
    pil = Image.fromarray(rgb)
    pil.save(tmp_path / "x.png")
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    ref = predict(tiny_model, tensor)
    for given in (pil, str(tmp_path / "x.png"), tmp_path / "x.png", tensor.float() / 255):
        out = predict(tiny_model, given)
        assert isinstance(out, dict) and out["masks"].shape[-2:] == (30, 36)
        torch.testing.assert_close(out["scores"], ref["scores"])
    many = predict(tiny_model, [pil, tensor, tmp_path / "x.png"], batch_size=2)
    assert isinstance(many, list) and len(many) == 3
    assert len(predict(tiny_model, (pil, pil))) == 2
    assert len(predict(tiny_model, torch.stack([tensor, tensor]))) == 2
    gray16 = Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))  # I;16: scaled, not saturated
    torch.testing.assert_close(predict(tiny_model, gray16)["scores"],
                               predict(tiny_model, Image.fromarray(rgb[..., 0]))["scores"], atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="PIL image"):
        predict(tiny_model, 3)
    with pytest.raises(TypeError, match="got ndarray"):
        predict(tiny_model, [rgb])


# ------------------------------------------------------------------------------------------------ 6. coco_evaluate
def test_coco_evaluate_takes_a_results_json_path(messy_coco, tmp_path):
    from istr.engine.evaluate import coco_evaluate

    coco = istr.data.load_coco_json(messy_coco)
    perfect = [{"image_id": 1, "category_id": 3, "score": 0.9, "bbox": [5, 5, 10, 10],
                "segmentation": _rle(40, 50, 5, 15, 5, 15)}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(perfect))
    from_list = coco_evaluate(coco, perfect)
    for given in (path, str(path)):
        assert coco_evaluate(messy_coco, given) == from_list
    assert from_list["bbox"]["AP50"] > 0
    gt_as_results = tmp_path / "gt.json"
    shutil.copy(messy_coco, gt_as_results)
    with pytest.raises(ValueError, match=r"expected a JSON list of detections.*ground-truth"):
        coco_evaluate(coco, gt_as_results)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        coco_evaluate(coco, tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        coco_evaluate(coco, tmp_path / "broken.json")
    with pytest.raises(ValueError, match=r"\[0\] must be an object with keys 'image_id'"):
        coco_evaluate(coco, [{"bbox": [0, 0, 1, 1]}])
    with pytest.raises(TypeError, match="list of result dicts"):
        coco_evaluate(coco, 5)


# ------------------------------------------------------------------------------------------------ 8. pretrained
@pytest.fixture()
def empty_hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9", "https://192.0.2.1", None])
def test_pretrained_unavailable_fails_fast(endpoint, empty_hf_cache, monkeypatch, sleeps):
    """Refused (port 9), black-holed (TEST-NET-1) and this machine's real endpoint (unreachable here)."""
    from huggingface_hub import constants

    from istr.hub import PretrainedUnavailableError, check_pretrained_available

    if endpoint is not None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    try:
        check_pretrained_available("resnet18", timeout_s=1.0)
    except PretrainedUnavailableError as exc:
        assert isinstance(exc, ConnectionError) and isinstance(exc, FileNotFoundError)
        assert "checkpoint_path=" in str(exc) and "--backbone-checkpoint" in str(exc)
        assert "timm/resnet18.a1_in1k" in str(exc)
    else:
        assert endpoint is None, "the host answered"  # only the real endpoint can be reachable (a networked CI)
    assert sleeps == []  # one connection attempt, no retries (the retrying path slept ~48 s)


def test_pretrained_checks_and_cached_weights_load_offline(empty_hf_cache, monkeypatch, sleeps):
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    from istr.hub import check_pretrained_available, pretrained_weights_access

    with pytest.raises(ValueError, match="unknown timm model"):
        check_pretrained_available("no_such_net")
    with pytest.raises(ValueError, match="no pretrained weights"):
        check_pretrained_available("resnet18.no_such_tag")
    with pytest.raises(TypeError, match="str"):
        check_pretrained_available(None)
    # weights in the cache: no error without a network, and timm reads them at once (no ~48 s of retries)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    torch.manual_seed(0)
    weights = timm.create_model("resnet18").state_dict()
    snapshot = empty_hf_cache / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(snapshot / "model.safetensors"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    check_pretrained_available("resnet18", timeout_s=1.0)
    with pretrained_weights_access("resnet18", timeout_s=1.0):
        assert constants.HF_HUB_OFFLINE is True
        body = timm.create_model("resnet18", pretrained=True, features_only=True)
    assert constants.HF_HUB_OFFLINE is False
    assert sleeps == []  # read from the cache, no retries
    assert torch.equal(body.conv1.weight, weights["conv1.weight"])


# ------------------------------------------------------------------------------------------------ 9. permissions
def test_atomic_save_gives_ordinary_permissions(tmp_path):
    from istr.fileio import atomic_save, atomic_write_bytes, default_file_mode

    old = os.umask(0o022)
    try:
        assert default_file_mode() == 0o644
        codec = istr.create_codec("dct", mask_size=8, dim=6)
        codec.save(tmp_path / "sub" / "codec.safetensors")
        assert stat.S_IMODE((tmp_path / "sub" / "codec.safetensors").stat().st_mode) == 0o644  # safetensors: 0600
        assert istr.load_codec(tmp_path / "sub" / "codec.safetensors").dim == 6
        os.umask(0o027)
        atomic_write_bytes(tmp_path / "b.bin", b"new")
        assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o640
    finally:
        os.umask(old)
    atomic_write_bytes(tmp_path / "b.bin", b"x", mode=0o600)
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o600

    def failing(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save(tmp_path / "b.bin", failing)
    assert (tmp_path / "b.bin").read_bytes() == b"x"  # the old file is intact, no temporary file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "sub"]
    with pytest.raises(IsADirectoryError):
        atomic_write_bytes(tmp_path / "sub", b"x")
    with pytest.raises(TypeError, match="bytes"):
        atomic_write_bytes(tmp_path / "c.bin", "text")


def test_check_readable_file_missing_directory_unreadable(tmp_path):
    from istr.fileio import check_readable_file

    with pytest.raises(FileNotFoundError, match=r"no codec file at .*missing\.safetensors"):
        check_readable_file(tmp_path / "missing.safetensors", "codec file")
    with pytest.raises(IsADirectoryError, match="is a directory; expected a file"):
        check_readable_file(tmp_path, "codec file")
    with pytest.raises(FileNotFoundError, match="missing"):
        istr.load_codec(tmp_path / "missing.safetensors")
    (tmp_path / "ok.bin").write_bytes(b"1")
    assert check_readable_file(tmp_path / "ok.bin") == tmp_path / "ok.bin"


def _can_drop_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("setpriv") is not None


def _nobody_cannot_run_python(env: dict[str, str]) -> str | None:
    """None when user nobody can start this interpreter and import istr; else why not (e.g. a venv or a Python
    under /root, a folder nobody may not enter)."""
    try:
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                               "import istr"], capture_output=True, text=True, timeout=900, cwd="/", env=env)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return f"exit status {done.returncode}: {lines[-1] if lines else 'no output'}"


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_unreadable_file_is_a_permission_error_not_missing():
    """A 0600 file of another user: PermissionError naming the mode, where safetensors says 'No such file'."""
    folder = Path(tempfile.mkdtemp(prefix="istr_perm_"))
    try:
        folder.chmod(0o755)
        codec_file = folder / "codec.safetensors"
        istr.create_codec("dct", mask_size=8, dim=6).save(codec_file)
        codec_file.chmod(0o600)
        script = ("import sys, istr\n"
                  "try:\n    istr.load_codec(sys.argv[1])\n"
                  "except PermissionError as e:\n    print('PermissionError', e)\n"
                  "except Exception as e:\n    print(type(e).__name__, e)\n")
        if os.geteuid() != 0:
            out = subprocess.run([sys.executable, "-c", script, str(codec_file)], capture_output=True, text=True,
                                 timeout=900, cwd=REPO).stdout
        elif _can_drop_root():  # root reads everything: ask as user nobody
            env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(folder)}
            why = _nobody_cannot_run_python(env)
            if why is not None:
                pytest.skip(f"user nobody (uid 65534) cannot run this test's interpreter {sys.executable} with istr "
                            f"({why}); run the suite from a Python and checkout that user may read and execute")
            out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                                  "-c", script, str(codec_file)], capture_output=True, text=True, timeout=900,
                                 cwd=REPO, env=env).stdout
        else:
            pytest.skip("running as root without setpriv: every file is readable")
        assert out.startswith("PermissionError") and "not readable by this user" in out and "-rw-------" in out, out
    finally:
        shutil.rmtree(folder)
