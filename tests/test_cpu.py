"""cpu: this host's processor model and flags, from real /proc/cpuinfo text."""

from pathlib import Path

from mixsd_jax.cpu import cpu_info, parse_cpuinfo, read_cpuinfo


def test_cpu_info_reads_this_linux_machine():
    model, flags = cpu_info()
    text = Path("/proc/cpuinfo").read_text()
    assert model and model in text
    assert flags and all(flag in text for flag in flags)


def test_the_first_processor_describes_the_host_and_arm_features_count_as_flags():
    xeon = (Path(__file__).parent / "fixtures" / "cpuinfo_xeon_amx.txt").read_text()
    model, flags = parse_cpuinfo(xeon)
    assert model == "Intel(R) Xeon(R) Processor" and "amx_bf16" in flags
    assert parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd bf16 sve\nCPU part\t: 0xd40\n") == (
        "", frozenset({"fp", "asimd", "bf16", "sve"}))


def test_no_cpuinfo_file_is_an_empty_description(tmp_path):
    assert read_cpuinfo(str(tmp_path / "absent")) == ("", frozenset())
