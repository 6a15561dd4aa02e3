"""The registry is the one source of variant names: the CLI, config validation and the default run read it;
a plug-in entry is checked against the contract when it is first used."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from ae_repr import variants
from ae_repr.cli import build_parser
from ae_repr.config import ALL_VARIANTS, ModelsConfig
from ae_repr.models import build_model, model_config
from ae_repr.models.ae import AE
from ae_repr.variants import BUILTIN, Variant, variant_names


def _help(argv: list[str]) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[argv[0]].format_help()


def _listed(help_text: str, flag: str) -> list[str]:
    """The variant names a flag's help lists."""
    text = " ".join(help_text.split())
    after = text.split(flag, 1)[1]
    listed = after.split("of:", 1)[1].split("--")[0].strip()  # up to the next option
    return [n.strip() for n in listed.replace(",", " ").split()]


@pytest.fixture
def extra_variant(monkeypatch: pytest.MonkeyPatch) -> str:
    """One more registry entry, as an installed plug-in would add (the AE class under another name)."""
    entries = {**BUILTIN, "extra_ae": Variant("ae_repr.models.ae:AE", default_run=False, source="test")}
    monkeypatch.setattr(variants, "registry", lambda: entries)
    return "extra_ae"


def test_cli_choices_are_the_registry(extra_variant: str) -> None:
    assert _listed(_help(["train"]), "--variant V") == list(variant_names())
    assert _listed(_help(["run"]), "--variants a,b,..") == list(variant_names())
    assert extra_variant in variant_names()


def test_config_accepts_exactly_the_registry(extra_variant: str) -> None:
    assert ModelsConfig(variants=[extra_variant]).variants == (extra_variant,)
    assert extra_variant not in ModelsConfig().variants  # not in the default run: it did not ask to be
    with pytest.raises(ValidationError, match="unknown variant 'nope'; choose from ae, .*extra_ae"):
        ModelsConfig(variants=["ae", "nope"])
    assert isinstance(build_model(extra_variant, model_config(extra_variant, latent_dim=3), (5,), "gaussian"), AE)


def test_default_run_comes_from_the_registry() -> None:
    assert ALL_VARIANTS == ("ae", "dae", "vae", "beta_vae", "vq_vae", "hier_vae")
    assert ALL_VARIANTS == tuple(n for n, v in BUILTIN.items() if v.default_run)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("ae_repr.nowhere:X", "cannot be imported"),
        ("ae_repr.models.base:ModelConfig", "not a subclass of ae_repr.models.Autoencoder"),
        ("ae_repr.models.ae:Missing", "cannot be imported"),
    ],
)
def test_a_broken_plugin_fails_with_its_name(monkeypatch: pytest.MonkeyPatch, target: str, message: str) -> None:
    monkeypatch.setattr(variants, "registry", lambda: {**BUILTIN, "broken": Variant(target, source="pkg")})
    with pytest.raises(ValueError, match=message):
        model_config("broken")


def test_a_plugin_cannot_take_a_builtin_name(monkeypatch: pytest.MonkeyPatch) -> None:
    class _Dist:
        name = "evil"

    class _EP:
        name, value, dist = "vae", "ae_repr.models.ae:AE", _Dist()

    monkeypatch.setattr(variants, "entry_points", lambda group: [_EP()] if group == variants.ENTRY_POINT_GROUP else [])
    variants.registry.cache_clear()
    try:
        assert variants.registry()["vae"] == BUILTIN["vae"]
    finally:
        variants.registry.cache_clear()
