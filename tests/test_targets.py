
import pytest

from conftest import run_cli
from edgepack.errors import EdgepackError
from edgepack.targets import list_profiles, load_profile


def test_builtin_profiles_load():
    profiles = list_profiles()
    assert {"x86", "rpi", "mobile"} <= set(profiles)
    x86 = profiles["x86"]
    # measured: unsigned activations are the fast int8 scheme on x86 VNNI (FACTS.md)
    assert x86.quantization.activation_type == "QUInt8" and x86.primary_format == "onnx"
    assert profiles["rpi"].arch == "aarch64" and profiles["rpi"].primary_format == "tflite"


@pytest.mark.parametrize("body,message", [
    ('arch = "x86_64"\nruntime = "onnxruntime"\nspeed = 3\n', "speed: unknown key"),
    ('arch = "x86_64"\nruntime = "onnxruntime"\nthreads = "four"\n', "threads:"),
    ('arch = "sparc"\nruntime = "onnxruntime"\n', "arch:"),
    ('arch = "x86_64"\nruntime = "onnxruntime"\n[budgets]\nlatency_p50_ms = -1\n', "budgets.latency_p50_ms"),
    ('arch = "x86_64"\nruntime = "onnxruntime"\n[quantization]\ncalibration_method = "Magic"\n', "quantization.calibration_method"),
    ('arch = "x86_64"\nruntime = "onnxruntime"\nthreads = [\n', "not valid TOML"),
])
def test_invalid_profile_is_named(tmp_path, body, message):
    (tmp_path / "mine.toml").write_text(body)
    with pytest.raises(EdgepackError) as e:
        load_profile("mine", [tmp_path])
    assert "mine.toml" in str(e.value) and message in str(e.value)


def test_user_profile_dir_shadows_and_adds(tmp_path):
    (tmp_path / "jetson.toml").write_text('arch = "aarch64"\nruntime = "onnxruntime"\nthreads = 6\n')
    (tmp_path / "x86.toml").write_text('name = "x86"\narch = "x86_64"\nruntime = "onnxruntime"\nthreads = 8\n')
    profiles = list_profiles([tmp_path])
    assert profiles["jetson"].threads == 6 and profiles["x86"].threads == 8


def test_unknown_target_lists_known(tmp_path):
    with pytest.raises(EdgepackError, match="known targets: mobile, rpi, x86"):
        load_profile("pi-zero")


def test_targets_cli():
    code, out, _ = run_cli("targets")
    assert code == 0 and "rpi" in out and "QUInt8" in out
    code, out, _ = run_cli("targets", "show", "x86")
    assert code == 0 and 'activation_type = "QUInt8"' in out
    import tomllib
    assert tomllib.loads(out)["name"] == "x86"  # `show` output is a valid profile
