"""Multi-host start-up settings, and a real two-process run on CPU that must give the same losses
(and the same exported weights) as one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from mixsd_jax.data.kgfact import build_kgfact
from mixsd_jax.data.layout import KGFACT_TRAIN
from mixsd_jax.errors import MixsdError
from mixsd_jax.multihost import DistributedConfig
from mixsd_jax.train.config import load_train_config
from mixsd_jax.multihost import resolve

ENV = {"MIXSD_COORDINATOR": "10.0.0.1:1234", "MIXSD_NUM_PROCESSES": "4", "MIXSD_PROCESS_ID": "2"}


def test_settings_from_environment_config_or_auto():
    assert resolve(DistributedConfig(), {}) is None
    assert resolve(DistributedConfig(), ENV) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    # Config keys win over the environment, one by one.
    assert resolve(DistributedConfig(process_id=3), ENV)["process_id"] == 3
    assert resolve(DistributedConfig(auto=True), {}) == {}
    assert resolve(DistributedConfig(), {"MIXSD_DISTRIBUTED": "auto"}) == {}


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"MIXSD_COORDINATOR": "h:1"}, "MIXSD_NUM_PROCESSES, MIXSD_PROCESS_ID not set"),
        ({**ENV, "MIXSD_PROCESS_ID": "4"}, r"process id 4 is outside \[0, 4\)"),
        ({**ENV, "MIXSD_NUM_PROCESSES": "two"}, "MIXSD_NUM_PROCESSES='two': expected an integer"),
        ({**ENV, "MIXSD_COORDINATOR": "hostonly"}, "expected host:port"),
    ],
)
def test_incomplete_or_bad_settings_are_errors(environ, message):
    with pytest.raises(MixsdError, match=message):
        resolve(DistributedConfig(), environ)


_WORKER = """
import json, sys
from mixsd_jax.train.config import load_train_config
from mixsd_jax.train.loop import train
losses = []
train(load_train_config(None, sys.argv[1:]), progress=False, on_step=lambda step, m: losses.append(m["loss"]))
print("LOSSES " + json.dumps(losses), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_losses_of_one_device(tiny_llama_dir, tmp_path):
    from mixsd_jax.train.loop import train

    build_kgfact(tmp_path / "kg", preset="tiny", seed=0)
    args = [f"model={tiny_llama_dir}", f"data={tmp_path / 'kg' / KGFACT_TRAIN}", "steps=3", "batch_size=8", "lr=1e-2",
            "max_seq_len=160", "pad_to_max_len=true", "seed=0", "async_checkpoints=false"]

    port = _free_port()
    procs = []
    for process_id in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
               "MIXSD_COORDINATOR": f"127.0.0.1:{port}", "MIXSD_NUM_PROCESSES": "2",
               "MIXSD_PROCESS_ID": str(process_id)}
        # The last step's export is gathered by both processes (collectives) and written by process 0;
        # `hf` is then its copy, made by process 0 alone.
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, *args, "save_every=3", "export_every=true",
                                       f"out={tmp_path / 'multi'}"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    multi = [json.loads(next(line for line in out.splitlines() if line.startswith("LOSSES "))[7:]) for out in outputs]
    assert multi[0] == multi[1]  # every process sees the same global metrics

    single = []
    train(load_train_config(None, [*args, "mesh.data=1", f"out={tmp_path / 'single'}"]), progress=False,
          on_step=lambda step, m: single.append(m["loss"]))
    np.testing.assert_allclose(multi[0], single, rtol=1e-5)

    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 4
    from safetensors.numpy import load_file

    ours = load_file(tmp_path / "multi" / "hf" / "model.safetensors")
    ref = load_file(tmp_path / "single" / "hf" / "model.safetensors")
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], atol=1e-5, err_msg=name)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        exported = tmp_path / "multi" / "exports" / "step_3" / name
        assert (tmp_path / "multi" / "hf" / name).read_bytes() == exported.read_bytes(), name

    # `train --export` on every host joins one run: the gathers are collectives, process 0 writes.
    import shutil

    import multihost_helpers as mh

    first = (tmp_path / "multi" / "hf" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "multi" / "hf")
    outputs = mh.run(["train", "--export", "latest", *args, f"out={tmp_path / 'multi'}"], timeout=120)
    assert "exported:" in outputs[0] and "exported:" not in outputs[1]
    assert (tmp_path / "multi" / "hf" / "model.safetensors").read_bytes() == first
