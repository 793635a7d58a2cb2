"""Tests for istr.registry.Registry and the codec registry built on it."""
import pytest

import istr
from istr.registry import Registry


def test_register_get_and_default_name():
    reg = Registry("widget")

    @reg.register("alpha")
    def alpha():
        return 1

    @reg.register()
    def beta():
        return 2

    assert reg.get("alpha") is alpha and reg.get("beta") is beta
    assert "alpha" in reg and "gamma" not in reg
    assert len(reg) == 2 and list(reg) == ["alpha", "beta"]
    assert "alpha" in repr(reg)


def test_list_wildcards_sorted():
    reg = Registry("model")
    for name in ["istr_r50_pca", "istr_r101_pca", "istr_r50_ae", "other"]:
        reg.register(name)(lambda: None)
    assert reg.list() == sorted(["istr_r50_pca", "istr_r101_pca", "istr_r50_ae", "other"])
    assert reg.list("istr_r50*") == ["istr_r50_ae", "istr_r50_pca"]
    assert reg.list("*_pca") == ["istr_r101_pca", "istr_r50_pca"]
    assert reg.list("istr_r?0_*") == ["istr_r50_ae", "istr_r50_pca"]
    assert reg.list("nothing*") == []


def test_duplicate_raises_unless_override():
    reg = Registry("codec")
    reg.register("x")(int)
    with pytest.raises(KeyError, match="already registered"):
        reg.register("x")(float)
    assert reg.get("x") is int
    reg.register("x", override=True)(float)
    assert reg.get("x") is float


def test_unknown_name_lists_known_names():
    reg = Registry("loss")
    reg.register("dice")(int)
    reg.register("focal")(int)
    with pytest.raises(KeyError, match=r"unknown loss 'dcie'.*dice, focal"):
        reg.get("dcie")
    with pytest.raises(KeyError, match=r"\(none\)"):
        Registry("empty").get("a")


def test_bad_names_rejected():
    reg = Registry("thing")
    with pytest.raises(TypeError, match="non-empty strings"):
        reg.register(3)(int)


def test_codec_registry_has_builtins_and_errors():
    assert set(istr.list_codecs()) >= {"pca", "dct", "identity", "autoencoder"}
    assert istr.list_codecs("p*") == ["pca"]
    with pytest.raises(KeyError, match="known codecs: .*autoencoder.*pca"):
        istr.create_codec("pcaa")
    codec = istr.create_codec("dct", mask_size=8, dim=10)
    assert type(codec).codec_name == "dct" and (codec.mask_size, codec.dim) == (8, 10)
