"""ExperimentConfig: YAML + overrides load into a validated config; bad methods, λ lists and
corpus settings fail at load time with the key named."""

import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.pipeline.config import CorpusConfig, ExperimentConfig, load_experiment


def _write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_the_config(tmp_path):
    path = _write(tmp_path, """
name: small
out_dir: out/small
model: /models/qwen
corpus: {kind: kgfunc, preset: tiny, seed: 3}
methods: [sft, mixsd]
lambdas: [0, 0.3]
generation: {max_new_tokens: 64}
train: {lr: 1e-5}
""")
    cfg = load_experiment(path, ["lambdas=[0.5]", "train.steps=7", "corpus.seed=4"])
    assert cfg.corpus == CorpusConfig(kind="kgfunc", preset="tiny", seed=4)
    assert cfg.methods == ("sft", "mixsd")
    assert cfg.lambdas == (0.5,)
    assert cfg.temperatures == (0.0,)
    assert cfg.generation == {"max_new_tokens": 64}
    assert cfg.train == {"lr": "1e-5", "steps": 7}  # typed later by TrainConfig
    assert cfg.mesh.data == -1


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["methods=[sft, dpo]"], "methods[1]"),
        (["methods=[]"], "methods"),
        (["methods=[sft, sft]"], "methods"),
        (["lambdas=[]"], "lambdas"),
        (["lambdas=[0.3, 1.5]"], "lambdas[1]"),
        (["lambdas=[0.3, 0.3]"], "lambdas"),
        (["temperatures=[-1]"], "temperatures[0]"),
        (["model="], "model"),
        (["corpus.kind=wiki"], "corpus.kind"),
        (["corpus.kind=released"], "corpus.source"),
        (["corpus.sead=1"], "corpus.sead"),
        (["epochs=3"], "epochs"),
    ],
)
def test_bad_settings_name_the_key(overrides, key):
    with pytest.raises(MixsdError) as err:
        load_experiment(None, overrides)
    message = str(err.value)
    assert "\n" not in message
    assert f"'{key}'" in message


def test_empty_lambdas_are_fine_without_mixsd():
    cfg = ExperimentConfig(methods=("base", "sft"), lambdas=())
    assert cfg.lambdas == ()
