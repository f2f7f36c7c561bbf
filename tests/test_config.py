"""The config system: YAML + overrides into frozen dataclasses, errors naming the key, fingerprints."""

import dataclasses

import pytest

from mixsd_jax import config
from mixsd_jax.errors import MixsdError


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 1e-5
    steps: int = 10


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "run"
    lambdas: tuple[float, ...] = (0.3,)
    mode: str | None = None
    train: Inner = Inner()
    flag: bool = False


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: demo\ntrain:\n  lr: 2e-5\n")
    cfg = config.load(Outer, path, ["train.steps=7", "lambdas=[0, 0.5]", "flag=true"])
    assert cfg == Outer(name="demo", lambdas=(0.0, 0.5), train=Inner(lr=2e-5, steps=7), flag=True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.step=3"], "unknown config key 'train.step'"),
        (["nope=1"], "unknown config key 'nope'"),
        (["train.steps=abc"], "config key 'train.steps': expected an integer"),
        (["flag=3"], "config key 'flag': expected true/false"),
        (["lambdas=0.3"], "config key 'lambdas': expected a list"),
        (["train=5"], "config key 'train': expected a section"),
        (["noequals"], "expected key=value"),
    ],
)
def test_bad_keys_and_types_name_the_key(overrides, message):
    with pytest.raises(MixsdError, match=message):
        config.load(Outer, None, overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(MixsdError, match="config file not found"):
        config.load(Outer, tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(MixsdError, match=r"bad.yaml:\d+: invalid YAML"):
        config.load(Outer, bad)


def test_fingerprint_is_stable_and_sensitive():
    a = config.load(Outer, None, ["train.lr=1e-4"])
    b = config.load(Outer, None, ["train.lr=0.0001"])
    c = config.load(Outer, None, ["train.lr=2e-4"])
    assert config.fingerprint(a) == config.fingerprint(b) == "%s" % config.fingerprint(a)
    assert config.fingerprint(a) != config.fingerprint(c)
    assert len(config.fingerprint(a)) == 16
    # Excluded keys do not count: a longer run of the same config has the same resume fingerprint.
    d = config.load(Outer, None, ["train.lr=1e-4", "train.steps=99"])
    assert config.fingerprint(a, exclude=["train.steps"]) == config.fingerprint(d, exclude=["train.steps"])


def test_cli_accepts_overrides_anywhere(tmp_path):
    from mixsd_jax.cli import main

    out = tmp_path / "kgfunc"
    assert main(["data", "build", "kgfunc", "--preset", "tiny", "seed=3", "--out", str(out)]) == 0
    assert '"seed": 3' in (out / "manifest.json").read_text()
    with pytest.raises(SystemExit):
        main(["data", "build", "kgfunc", "--out", str(out), "stray-token"])
