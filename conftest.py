"""Test set-up: 8 simulated CPU devices, fp32 matmuls, offline HF."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

from jlora.train import reuse_host_memory  # noqa: E402

reuse_host_memory()  # before the first JAX computation: steps reuse their temporaries

jax.config.update("jax_default_matmul_precision", "highest")
