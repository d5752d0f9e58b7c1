"""Shared fixtures: the tiny preset's models and bundles, built once per test session."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from xdist_groups import XDIST_ORDER, xdist_group  # tests/xdist_groups.py

for _name in ("onnx_ir", "onnxscript", "torch.onnx"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def pytest_configure(config: pytest.Config) -> None:
    """Prompt embeddings cached on disk go to a folder of this test run (never the user's ~/.cache), removed at
    its end; a pytest run inside a test (test_cpp_skip_policy.py) inherits its parent's through the environment.
    Under `-n` the workers get one OpenMP thread each."""
    if getattr(config.option, "numprocesses", None):  # the xdist controller, before it starts the workers
        # one OpenMP/BLAS thread per worker: two workers on two cores with two threads each contend
        # (docs/development.md, "Test lanes": the measured difference)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "STDRC_PROMPT_CACHE" in os.environ:
        return
    folder = tempfile.mkdtemp(prefix="stdrc-test-prompts-")
    os.environ["STDRC_PROMPT_CACHE"] = folder

    def remove() -> None:
        os.environ.pop("STDRC_PROMPT_CACHE", None)
        shutil.rmtree(folder, ignore_errors=True)

    config.add_cleanup(remove)


RAY_STORE = 200 * 2**20  # object store per simulated Ray node


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's per-module scheduling with XDIST_GROUPS, in the workers' collection order (below)."""
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::")[0]
            return xdist_group(file) or file

    config.option.loadscopereorder = False  # not by test count: XDIST_ORDER
    return FileGroups(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules that use `ray_cluster` run last, in their own order: one cluster, alive only while they run.
    On an xdist worker, groups in XDIST_ORDER and the `ray_cluster` modules last within theirs (the ray group
    holds every `ray_cluster` module: test_xdist_groups.py)."""
    def file(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    ray_files = {file(item) for item in items if "ray_cluster" in getattr(item, "fixturenames", ())}
    on_worker = hasattr(config, "workerinput")
    # stable: the rest keeps its order; a test starting Ray of its own (serve_load) runs before the cluster
    items.sort(key=lambda item: (XDIST_ORDER.index(xdist_group(file(item))) if on_worker else 0,
                                 file(item) in ray_files))


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the serve and app tests: two simulated nodes of 2 CPUs (a replica reserving 2 lands
    one per node). Each module deploys its app on it, then undeploys and shuts Serve down."""
    pytest.importorskip("ray.serve")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": RAY_STORE})
    try:
        cluster.add_node(num_cpus=2, object_store_memory=RAY_STORE)
        ray.init(address=cluster.address, namespace="stdrc", logging_level="WARNING")
        yield cluster
    finally:
        try:
            ray.shutdown()
        finally:
            cluster.shutdown()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stage-cache")


@pytest.fixture(scope="session")
def tiny_models():
    from stdrc.export.models import load_models

    return load_models("tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    from stdrc.engines.build import BuildConfig, build_engines

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return build_engines(BuildConfig(out=out, cache_dir=cache_dir, backend="onnxruntime", progress=False))


@pytest.fixture(scope="session")
def two_stage_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The tiny preset as a two-stage bundle (a random tiny upsampler and rank-4 refinement LoRA), bucket
    9x128x64 so its stage-1 half is 9x64x32: the one every two-stage test shares (Python and C++)."""
    from stdrc.engines.build import BuildConfig, build_engines

    out = tmp_path_factory.mktemp("bundles") / "tiny-two-stage"
    return build_engines(BuildConfig(out=out, cache_dir=cache_dir, backend="onnxruntime", progress=False,
                                     buckets=("9x128x64",), two_stage=True))


@pytest.fixture(scope="session")
def two_stage_tiny23_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The tiny23 preset (LTX-2.3's DiT flags: `dit` and `dit_refine` take `sigma`) as a two-stage ONNX Runtime
    bundle at 9x128x64: the 2.3 case of the two-stage parity and verify tests (parametrized beside tiny's)."""
    from stdrc.engines.build import BuildConfig, build_engines

    out = tmp_path_factory.mktemp("bundles") / "tiny23-two-stage"
    return build_engines(BuildConfig(preset="tiny23", out=out, cache_dir=cache_dir, backend="onnxruntime",
                                     progress=False, buckets=("9x128x64",), two_stage=True))


@pytest.fixture(scope="session")
def astronaut_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import skimage.data

    path = tmp_path_factory.mktemp("images") / "astronaut.png"
    cv2.imwrite(str(path), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="session")
def blank_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "blank.png"
    cv2.imwrite(str(path), np.full((256, 256, 3), 127, np.uint8))
    return path


def write_tiny_gemma(folder: Path, hidden_size: int = 32, text_only: bool = False) -> Path:
    """A random Gemma-3 (text + vision, as a real gemma-3-*-it folder) with a BPE tokenizer trained here.

    Its width matches the tiny preset's connector; one sliding and one full attention layer.
    `text_only`: a `gemma3_text` folder (Gemma3ForCausalLM, as gemma-3-1b ships).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        Gemma3Config,
        Gemma3ForCausalLM,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        PreTrainedTokenizerFast,
        SiglipVisionConfig,
    )

    from stdrc.calibration.data import CALIBRATION_PROMPTS

    text = Gemma3TextConfig(
        vocab_size=300, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        max_position_embeddings=64, layer_types=["sliding_attention", "full_attention"],
    )
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          boi_token_index=297, eoi_token_index=298, image_token_index=299)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(text) if text_only else Gemma3ForConditionalGeneration(config)
    model.save_pretrained(folder)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    bpe.train_from_iterator(CALIBRATION_PROMPTS, trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    bpe.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def make_tiny_gemma():
    return write_tiny_gemma


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gemma(tmp_path_factory.mktemp("gemma") / "gemma-3-tiny")


@pytest.fixture(scope="session")
def aoti_tiny23_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The tiny23 preset (LTX-2.3's DiT flags: a `sigma` input) as aoti packages, once per session: the C++
    runner's 2.3 case and the aoti DiT's parity with ltx-core (tests/cpp, tests/engines/test_aoti.py). Five
    AOTInductor compiles: 83 s on the shared 2-core VM, the DiT's 15 s of it (2026-12-07, load 3)."""
    from stdrc.engines.build import BuildConfig, build_engines

    out = tmp_path_factory.mktemp("aoti-bundle23") / "tiny23"
    return build_engines(BuildConfig(preset="tiny23", out=out, cache_dir=cache_dir, backend="aoti", progress=False))


@pytest.fixture(scope="session")
def aoti_two_stage_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The tiny preset as the two-stage aoti bundle build-engines makes (bucket 9x128x64, stage 1 at 9x64x32, the
    random tiny upsampler, the seeded rank-4 refinement LoRA at strength 1): `dit_refine` is a package without
    constants, given the dit package's and the LoRA's at load (engines/aoti.py). Shared by the C++ runner's tests,
    one-stage (`stages=1`) and two-stage, and the aoti parity tests (tests/engines/test_aoti.py): one build instead
    of a second tiny one-stage bundle. Seven AOTInductor compiles: 275 s on the shared 2-core VM (2026-12-07,
    load 3)."""
    from stdrc.engines.build import BuildConfig, build_engines

    out = tmp_path_factory.mktemp("aoti-two-stage") / "tiny-two-stage"
    return build_engines(BuildConfig(out=out, cache_dir=cache_dir, backend="aoti", buckets=("9x128x64",),
                                     two_stage=True, progress=False))
