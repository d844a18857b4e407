"""OrtModel: an onnxruntime session for models written by to_onnx or export_causal_lm, and
the session set-up and input checks that OrtCausalLM shares."""
from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np
import torch

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
             "tensor(double)": np.float64, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(bool)": np.bool_}


def make_session(path: str, providers: Optional[list[str]] = None, options=None):
    """An onnxruntime InferenceSession; providers None picks CUDA when onnxruntime-gpu sees a
    GPU, else the CPU provider. FileNotFoundError / ValueError name the path or provider."""
    import onnxruntime as ort

    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model not found: {path!r}")
    available = ort.get_available_providers()
    if providers is None:
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"]
                     if "CUDAExecutionProvider" in available else ["CPUExecutionProvider"])
    for p in providers:
        if p not in available:
            raise ValueError(f"execution provider {p!r} is not available; this "
                             f"onnxruntime has {available}")
    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no notes on optional inputs
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    load_errors = (RuntimeError, state.Fail, state.InvalidArgument, state.InvalidGraph,
                   state.InvalidProtobuf, state.NoModel, state.NotImplemented)
    try:
        session = ort.InferenceSession(path, sess_options=options, providers=providers)
    except load_errors as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a model onnxruntime can load ({first})") from None
    dropped = [p for p in providers if p not in session.get_providers()]
    if dropped:  # e.g. CUDA listed by onnxruntime-gpu but no GPU or CUDA libraries found
        warnings.warn(f"{os.path.basename(path)}: execution provider(s) {dropped} could not "
                      f"start; running on {session.get_providers()[0]}", stacklevel=3)
    return session


def check_input(name: str, value, spec) -> None:
    """ValueError naming the input when `value` has the wrong rank or the wrong kind of dtype
    (integer vs floating point vs bool) for the graph input `spec` (onnxruntime NodeArg);
    within a kind the value is cast."""
    rank = len(spec.shape)
    if len(value.shape) != rank:
        raise ValueError(f"input {name!r} must have {rank} dims {spec.shape}, got shape "
                         f"{tuple(value.shape)}")
    want = np.dtype(_NP_TYPES.get(spec.type, np.float32))
    got = np.dtype(str(value.dtype).replace("torch.", ""))
    if want.kind != got.kind and not (want.kind in "iu" and got.kind in "iu"):
        raise ValueError(f"input {name!r} must be {spec.type[7:-1]}, got {got.name}")


class OrtModel:
    """OrtModel(path, providers=None)(**inputs) -> {output name: numpy array}.

    providers None picks CUDA when onnxruntime-gpu sees a GPU, else the CPU provider.
    Inputs may be numpy arrays or torch tensors; CUDA tensors go through IO binding, so
    they are read on the device without a copy through the host.
    """

    def __init__(self, path: str, providers: Optional[list[str]] = None):
        self.path = path
        self.session = make_session(path, providers)
        self.providers = self.session.get_providers()
        self.provider = self.providers[0]  # the provider that runs the graph
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        # inputs with a default value (e.g. group_bias): may be left out
        self.optional_inputs = {i.name: i for i in self.session.get_overridable_initializers()}
        self._specs = {**self.optional_inputs, **self.inputs}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def _check(self, inputs: dict) -> None:
        unknown = sorted(set(inputs) - set(self._specs))
        missing = sorted(set(self.inputs) - set(inputs))
        if unknown or missing:
            optional = f" (optional: {sorted(self.optional_inputs)})" if self.optional_inputs else ""
            raise ValueError(f"{os.path.basename(self.path)} takes inputs {sorted(self.inputs)}"
                             f"{optional}; unknown {unknown}, missing {missing}")
        for name, value in inputs.items():
            check_input(name, value, self._specs[name])

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        self._check(inputs)
        on_cuda = any(getattr(v, "is_cuda", False) for v in inputs.values())
        if on_cuda and "CUDAExecutionProvider" in self.providers:
            return self._run_bound(inputs)
        feeds = {}
        for name, value in inputs.items():
            array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            feeds[name] = array.astype(_NP_TYPES.get(self._specs[name].type, array.dtype), copy=False)
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def _run_bound(self, inputs: dict) -> dict[str, np.ndarray]:
        """IO binding: inputs read from device memory, outputs allocated on the device."""
        binding = self.session.io_binding()
        keep = []
        for name, value in inputs.items():
            want = _NP_TYPES[self._specs[name].type]
            t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
            t = t.to(device="cuda", dtype=getattr(torch, np.dtype(want).name)).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", t.device.index or 0, want, list(t.shape), t.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))
