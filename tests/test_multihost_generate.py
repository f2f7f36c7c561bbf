"""`mixsd generate` on two local processes joined into one JAX run writes the bytes of one process
and of 8 simulated devices; a run whose processes are all killed mid-generation resumes with ONE
process to the same bytes. Bad multi-host settings are one-line errors."""

import json
from pathlib import Path

import pytest

import multihost_helpers as mh
from mixsd_jax.cli import main
from mixsd_jax.sampling.generator import GenerateConfig, Paths, generate

# Words the tiny random model writes often pass the `contains` verifier now and then, rare ones
# never: both files get rows (seed 2: 4 accepted), and sampling with one retry exercises the retries.
WORDS = ["s", "f", "question", "3", "pro", "it", "5", "git", "zebra", "Paris", "France", "capital"]
SETTINGS = ["lambda_mix=0.3", "temperature=1.0", "max_retries=1", "extract_mode=contains", "max_new_tokens=12",
            "max_model_len=256", "batch_size=2", "seed=2"]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gen_input") / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is item {i} of the list?"},
                          {"role": "assistant", "content": f"It is \\boxed{{{w}}}."}]}
            for i, w in enumerate(WORDS * 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _overrides(model_dir, records, out_dir) -> list[str]:
    return [f"input={records}", f"model={model_dir}", f"out_dir={out_dir}", *SETTINGS]


def _in_process(model_dir, records, out_dir, mesh_data: int) -> Paths:
    from mixsd_jax import config as config_lib

    cfg = config_lib.load(GenerateConfig, None, [*_overrides(model_dir, records, out_dir), f"mesh.data={mesh_data}"])
    generate(cfg, progress=False)
    return Paths.for_config(cfg)


def _this_run(paths: Paths) -> tuple[int, int]:
    run = json.loads(paths.summary.read_text())["this_run"]
    return run["processes"], run["devices"]


def _files(paths: Paths) -> dict:
    summary = json.loads(paths.summary.read_text())
    summary.pop("this_run")  # timings
    for key in ("output", "rejected_output"):
        summary[key] = Path(summary[key]).name
    return {"accepted": paths.final.read_bytes(), "rejected": paths.rejected.read_bytes(), "summary": summary}


@pytest.fixture(scope="module")
def one_device(tiny_llama_dir, records, tmp_path_factory) -> dict:
    files = _files(_in_process(tiny_llama_dir, records, tmp_path_factory.mktemp("one"), mesh_data=1))
    assert files["accepted"] and files["rejected"], "the fixture should give both accepted and rejected rows"
    assert files["summary"]["mean_attempts"] > 1  # retries happened
    return files


def test_two_processes_and_eight_devices_write_the_bytes_of_one(tiny_llama_dir, records, one_device, tmp_path):
    out = tmp_path / "two"
    outputs = mh.run(["generate", *_overrides(tiny_llama_dir, records, out)])
    assert "wrote" in outputs[0]
    paths = Paths.for_config(GenerateConfig(input=str(records), out_dir=str(out), model=str(tiny_llama_dir),
                                            lambda_mix=0.3, temperature=1.0))
    assert _files(paths) == one_device
    assert _this_run(paths) == (2, 4)  # really two processes with two devices each
    assert outputs[0].splitlines()[-3] == outputs[1].splitlines()[-3]  # both saw the same result
    assert not paths.partial.exists() and not paths.meta.exists()
    # Only process 0 wrote: no stray temporary files of a second writer.
    assert sorted(p.name for p in out.iterdir()) == sorted([paths.final.name, paths.rejected.name, paths.summary.name])

    eight = _in_process(tiny_llama_dir, records, tmp_path / "eight", mesh_data=8)
    assert _files(eight) == one_device and _this_run(eight) == (1, 8)


def test_two_processes_with_tensor_parallel_hosts_write_the_same_bytes(tiny_llama_dir, records, one_device, tmp_path):
    """The pod layout: records split over the hosts (`data`), each host's chips split the model (`tensor`)."""
    out = tmp_path / "tp"
    mh.run(["generate", *_overrides(tiny_llama_dir, records, out), "mesh.data=2", "mesh.tensor=2"])
    paths = Paths.for_config(GenerateConfig(input=str(records), out_dir=str(out), model=str(tiny_llama_dir),
                                            lambda_mix=0.3, temperature=1.0))
    assert _files(paths) == one_device and _this_run(paths) == (2, 4)


def test_killed_two_process_run_resumes_with_one_process(tiny_llama_dir, records, one_device, tmp_path):
    out = tmp_path / "killed"
    partial = out / (Paths.for_config(GenerateConfig(input=str(records), out_dir=str(out), model=str(tiny_llama_dir),
                                                     lambda_mix=0.3, temperature=1.0)).partial.name)

    def mid_generation() -> bool:
        return partial.exists() and partial.read_text().count("\n") >= 2

    mh.kill_when(["generate", *_overrides(tiny_llama_dir, records, out)], mid_generation)
    done = partial.read_text().count("\n")
    assert 2 <= done < len(WORDS) * 2, "the kill should land mid-generation"
    paths = _in_process(tiny_llama_dir, records, out, mesh_data=1)
    assert _files(paths) == one_device


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MIXSD_NUM_PROCESSES": "2", "MIXSD_PROCESS_ID": "0"}, "MIXSD_COORDINATOR not set"),
        ({"MIXSD_COORDINATOR": "127.0.0.1:1", "MIXSD_NUM_PROCESSES": "2", "MIXSD_PROCESS_ID": "2"},
         r"process id 2 is outside \[0, 2\)"),
    ],
)
def test_bad_multihost_settings_are_one_line_errors(tiny_llama_dir, records, tmp_path, monkeypatch, capsys, env,
                                                   message):
    import re

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["generate", *_overrides(tiny_llama_dir, records, tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_an_unreachable_coordinator_is_a_one_line_error(tiny_llama_dir, records, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIXSD_COORDINATOR", f"127.0.0.1:{mh.free_port()}")  # nobody listens there
    monkeypatch.setenv("MIXSD_NUM_PROCESSES", "2")
    monkeypatch.setenv("MIXSD_PROCESS_ID", "1")
    monkeypatch.setenv("MIXSD_INIT_TIMEOUT", "1")
    assert main(["generate", *_overrides(tiny_llama_dir, records, tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no coordinator reachable after 1s" in err, err


def test_a_mesh_that_does_not_match_the_devices_is_a_one_line_error(tiny_llama_dir, records, tmp_path, capsys):
    assert main(["generate", *_overrides(tiny_llama_dir, records, tmp_path), "mesh.data=3", "mesh.tensor=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mesh: data*fsdp*tensor = 12 but there are 8 devices" in err, err


def test_killed_two_process_run_on_a_bucket_resumes_to_the_local_bytes(tiny_llama_dir, records, one_device, tmp_path,
                                                                       gcs_bucket, monkeypatch):
    """Both processes write nothing but the bucket (each in its own working directory); killed
    mid-generation, the chunked stream resumes with one process to the bytes of a local run."""
    from mixsd_jax import storage

    monkeypatch.setenv("MIXSD_FLUSH_SECONDS", "0")  # one chunk object per finished record
    out = f"{gcs_bucket}/gen"
    partial = Paths.for_config(GenerateConfig(input=str(records), out_dir=out, model=str(tiny_llama_dir),
                                              lambda_mix=0.3, temperature=1.0)).partial

    def mid_generation() -> bool:
        return partial.exists() and len(list(partial.iterdir())) >= 2

    mh.kill_when(["generate", *_overrides(tiny_llama_dir, records, out)], mid_generation)
    chunks = sorted(p.name for p in partial.iterdir())
    assert 2 <= len(chunks) < len(WORDS) * 2 and chunks[0] == "000000.jsonl", chunks
    paths = _in_process(tiny_llama_dir, records, out, mesh_data=1)
    assert _files(paths) == one_device
    # Besides the outputs, only the run's shared XLA cache, there once a compile took over the cache's
    # 2 s threshold (the tiny model's may not, on an idle machine).
    outputs = {p.name for p in storage.path(out).iterdir()} - {".jax_cache"}
    assert not partial.exists() and outputs == {paths.final.name, paths.rejected.name, paths.summary.name}
    assert not list(mh.ROOT.glob("gs:*")) and not list(tmp_path.rglob("gs:*"))


def test_one_process_fails_and_both_stop_with_its_error(tiny_llama_dir, records, tmp_path, gcs_bucket):
    """Process 1 has no input in its own working directory (hosts share no disk); process 0 does
    and goes on into a collective with it. Both stop within 60 s, both naming process 1's error."""
    import shutil
    import time

    hosts = mh.own_host(tmp_path)
    shutil.copy(records, hosts(0)[0] / "train.jsonl")
    args = ["generate", *_overrides(tiny_llama_dir, "train.jsonl", f"{gcs_bucket}/gen")]
    procs = mh.start(args, hosts=hosts)
    started = time.monotonic()
    try:
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        mh.stop(procs)
    assert time.monotonic() - started < 90  # start-up (imports, joining) plus the bounded stop
    missing = str(hosts(1)[0] / "train.jsonl")
    assert procs[1].returncode == 2 and f"error: {missing}: file not found" in outputs[1], outputs[1][-2000:]
    assert procs[0].returncode != 0, outputs[0][-2000:]
    assert f"error: process 1 failed: {missing}: file not found" in outputs[0], outputs[0][-2000:]


def test_a_relative_out_dir_with_two_processes_is_an_error_before_joining(tiny_llama_dir, records, tmp_path):
    procs = mh.start(["generate", *_overrides(tiny_llama_dir, records, "outputs/gen")], hosts=mh.own_host(tmp_path))
    try:
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        mh.stop(procs)
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 2, output[-2000:]
        assert "error: config key 'out_dir': outputs/gen is on this host's disk, but the run has 2 processes" in output
    assert not list(tmp_path.rglob("outputs"))  # nothing written


@pytest.mark.parametrize("where, message", [
    ("gs://no-such-bucket/gen", r"config key 'out_dir': gs://no-such-bucket/gen: bucket gs://no-such-bucket does not exist"),
    ("unreachable", r"config key 'out_dir': gs://.*STORAGE_EMULATOR_HOST\) is not reachable"),
])
def test_a_bucket_that_cannot_be_written_is_one_line(tiny_llama_dir, records, gcs_bucket, monkeypatch, capsys, where,
                                                     message):
    import re

    out = where
    if where == "unreachable":
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
        out = f"{gcs_bucket}/gen"
    assert main(["generate", *_overrides(tiny_llama_dir, records, out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_a_process_killed_without_a_word_stops_the_other_within_the_heartbeat(tiny_llama_dir, records, tmp_path,
                                                                               monkeypatch):
    """Process 1 is SIGKILLed mid-generation (no error posted); process 0, waiting on it, exits
    non-zero within the heartbeat timeout with one line naming process 1."""
    import os
    import re
    import signal
    import time

    monkeypatch.setenv("MIXSD_HEARTBEAT_TIMEOUT", "10")
    out = tmp_path / "gen"
    partial = out / Paths.for_config(GenerateConfig(input=str(records), out_dir=str(out), model=str(tiny_llama_dir),
                                                    lambda_mix=0.3, temperature=1.0)).partial.name
    procs = mh.start(["generate", *_overrides(tiny_llama_dir, records, out)])
    try:
        deadline = time.monotonic() + 240
        while not (partial.exists() and partial.read_text().count("\n") >= 1):
            ended = [p.communicate()[0][-3000:] for p in procs if p.poll() is not None]
            assert not ended, f"a process ended before the kill point: {ended}"
            assert time.monotonic() < deadline, "kill point not reached in time"
            time.sleep(0.05)
        os.killpg(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        output = procs[0].communicate(timeout=90)[0]
        waited = time.monotonic() - killed
    finally:
        mh.stop(procs)
    assert procs[0].returncode == 1, output[-3000:]
    assert waited < 10 + 20, waited  # the timeout, a look every 0.5 s, a loaded machine
    errors = re.findall(r"error:[^\r\n]*", output)  # the progress bar may share its line
    assert errors == ["error: process 1 stopped answering for 10 s (killed, or out of memory?); stopping"], output[-3000:]
