"""Shared test set-up: 8 fake CPU devices, the JAX persistent compile cache, tiny HF reference models."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu, when installed, is only the compiler of tests/test_plan.py

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = os.environ.get("ARM_JAX_TEST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from tests import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def mesh1():
    """A one-device mesh: the unsharded reference."""
    import arm_jax as aj
    return aj.make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """hf_model(kind) -> (folder written by save_pretrained, the float32 eager torch model); cached per session."""
    cache = {}

    def get(kind: str, **save_kwargs):
        key = (kind, tuple(sorted(save_kwargs.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(kind)
            model = hf_models.build(kind)
            model.save_pretrained(folder, **save_kwargs)
            cache[key] = (str(folder), model)
        return cache[key]

    return get


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every jitted program after each test module. One process compiles hundreds of XLA:CPU executables
    over the suite (more since programs compile per bucket), each holding JIT code mappings; past the kernel's
    mapping limit (vm.max_map_count, 65530 by default) XLA segfaulted mid-suite. Later modules reload what they need
    from the persistent compile cache."""
    yield
    jax.clear_caches()
