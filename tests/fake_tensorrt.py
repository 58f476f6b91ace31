"""A stand-in for the ``tensorrt`` module with the API surface :func:`qexport.export.build_engine` uses.

TensorRT cannot be installed on the machines that run these tests. This module records what the builder is
asked to do (network flags, memory pool, timing cache, optimization profile shapes) so a test can check
qexport's side of the build; its "parser" reads the ONNX graph's inputs with onnx (dynamic axes as -1, as
TensorRT reports them) and its "engine" is a marker byte string. It builds nothing.
"""

from __future__ import annotations

import onnx

ENGINE = b"fake-serialized-engine"
calls: list = []  # the Builder instances made, newest last


class Logger:
    WARNING = 2

    def __init__(self, severity):
        self.severity = severity


class NetworkDefinitionCreationFlag:
    STRONGLY_TYPED = 5


class MemoryPoolType:
    WORKSPACE = 0


class _Tensor:
    def __init__(self, name, shape):
        self.name, self.shape = name, tuple(shape)


class _Network:
    def __init__(self, flags):
        self.flags = flags
        self.inputs: list[_Tensor] = []

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class OnnxParser:
    errors: list[str] = []  # set by a test to make parsing fail

    def __init__(self, network, logger):
        self.network = network

    def parse_from_file(self, path):
        graph = onnx.load(path, load_external_data=False).graph
        inits = {i.name for i in graph.initializer}
        for i in graph.input:
            if i.name not in inits:
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim]
                self.network.inputs.append(_Tensor(i.name, dims))
        return not self.errors

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


class _TimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return b"timing-cache:" + self.data


class _Profile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class _Config:
    def __init__(self):
        self.pools, self.profiles, self.cache_in = {}, [], None

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def create_timing_cache(self, data):
        self.cache_in = bytes(data)
        return _TimingCache(self.cache_in)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache

    def get_timing_cache(self):
        return self.cache

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)


class Builder:
    def __init__(self, logger):
        self.network = self.config = None
        calls.append(self)

    def create_network(self, flags):
        self.network = _Network(flags)
        return self.network

    def create_builder_config(self):
        self.config = _Config()
        return self.config

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        return ENGINE
