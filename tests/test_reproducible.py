"""Reproducible numbers: the tiny build's bytes depend neither on the number of threads nor on the CPU
kernels torch or MKL would pick (common.reproducible_cpu), the tiny model has the published bytes
(finetune.CHECKSUMS), and the build says when it does not."""
import hashlib
import json
import os

import pytest

import common
import finetune
from conftest import run_script

CPU = common.reproducible_cpu()
needs_avx2 = pytest.mark.skipif(not CPU, reason="the reproducible arithmetic needs an x86-64 CPU with AVX2 and FMA")


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_reproducible_cpu_reads_the_cpu_flags(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma avx512f\n"
                 "processor\t: 1\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma avx512f\n")
    assert common.reproducible_cpu(str(f)) == dict(ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2,STRICT")
    assert common.cpu_info(str(f)) == ("AuthenticAMD", {"fpu", "sse2", "avx", "avx2", "fma", "avx512f"})
    f.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx fma\n")  # no AVX2: torch and MKL as they are
    assert common.reproducible_cpu(str(f)) == {}
    assert common.reproducible_cpu(str(tmp_path / "missing")) == {}  # not Linux


@needs_avx2
def test_build_bytes_do_not_depend_on_threads_or_cpu_kernels(tmp_path):
    """Three short builds, each with other threads and other kernels asked for in the environment
    (ATEN_CPU_CAPABILITY, MKL's dispatch limited to AVX2 as on a CPU without AVX-512): the same
    model and tokenizer, byte for byte. Without common.reproducible_cpu the first two differ."""
    variants = [dict(OMP_NUM_THREADS="1", ATEN_CPU_CAPABILITY="avx512"),
                dict(OMP_NUM_THREADS="2", ATEN_CPU_CAPABILITY="default", MKL_CBWR="AUTO"),
                dict(OMP_NUM_THREADS="3", MKL_ENABLE_INSTRUCTIONS="AVX2")]
    got = []
    for k, env in enumerate(variants):
        out = tmp_path / f"b{k}"
        r = run_script("finetune.py", "--max-steps", "3", "--out", str(out), "--log-every", "100",
                       env=dict(os.environ, **env))
        assert r.returncode == 0, r.stderr
        args = json.load(open(out / "args.json"))
        assert (args["cpu_kernels"], args["mkl_cbwr"]) == ("AVX2", "AVX2,STRICT")  # as recorded with the run
        got.append((digest(out / "model.safetensors"), digest(out / "tokenizer.json")))
    assert got[0] == got[1] == got[2]


def test_the_tiny_model_has_the_published_bytes(tiny_path):
    """The suite's own build of the tiny target model (or the cached one) is the published one, where
    the versions and the arithmetic are the published build's."""
    now = common.arithmetic()
    differ = {k: (now[k], v) for k, v in finetune.PUBLISHED.items() if str(now[k]) != v}
    if differ:
        pytest.skip(f"not the published build's versions or kernels: {differ}")
    assert digest(os.path.join(tiny_path, "model.safetensors")) == finetune.CHECKSUMS["full"]


def test_checksum_line_says_what_differs(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"some other bytes")
    want = hashlib.sha256(b"some other bytes").hexdigest()
    monkeypatch.setitem(finetune.CHECKSUMS, "full", want)
    assert finetune.checksum_line(tmp_path, "full") == (f"model.safetensors SHA-256 {want}: the published bytes "
                                                        f"(docs/reproducibility.md)")
    monkeypatch.setitem(finetune.CHECKSUMS, "full", "0" * 64)
    monkeypatch.setitem(finetune.PUBLISHED, "torch", "0.1")
    line = finetune.checksum_line(tmp_path, "full")
    assert f"SHA-256 {want} differs from the published {'0' * 64}" in line
    assert f"torch {common.arithmetic()['torch']} (published: 0.1)" in line and "transformers" not in line
