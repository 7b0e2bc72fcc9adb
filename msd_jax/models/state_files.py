"""Reading a state dict {tensor name: float32 array} from a weights file a user downloaded:
PyTorch (.pth / .pt / .bin, through torch.load with weights_only=True, torch imported only then),
safetensors (read here: an 8-byte little-endian header length, a JSON header, the raw bytes; no
dependency) or numpy .npz (msd_jax.export's format, read without pickle)."""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from msd_jax import trust

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}
MAX_HEADER_BYTES = 100 << 20


def read_state_dict(path: str):
    """The file's nested mapping of arrays (wrapper dicts such as DINO's 'teacher' kept: see
    timm_layout.unwrap); trust.InputError naming the file when it cannot be read."""
    if not os.path.isfile(path):
        raise trust.InputError(f"{path}: not found (config.model.init_from: a .pth/.pt, .safetensors "
                               "or .npz weights file, or an msd_jax backbone folder)")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in TORCH_SUFFIXES:
        return read_torch(path)
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix == ".npz":
        return read_npz(path)
    raise trust.InputError(f"{path}: unknown weights format {suffix!r}; expected one of "
                           f"{list(TORCH_SUFFIXES) + ['.safetensors', '.npz']}")


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise trust.InputError(f"{path}: {size} bytes, too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise trust.InputError(f"{path}: header length {n} does not fit the {size}-byte file "
                                   "(not a safetensors file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise trust.InputError(f"{path}: the safetensors header is not JSON ({e})") from None
        data = f.read()
    if not isinstance(header, dict):
        raise trust.InputError(f"{path}: the safetensors header is not a JSON object")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise trust.InputError(f"{path}: tensor {name!r}: header entry {info!r} lacks dtype/shape/"
                                   f"data_offsets ({e})") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise trust.InputError(f"{path}: tensor {name!r} has dtype {dtype!r}, expected one of "
                                   f"{sorted(SAFETENSORS_DTYPES)}")
        np_dtype = SAFETENSORS_DTYPES[dtype] or np.uint16
        count = int(np.prod(shape)) if shape else 1
        if not 0 <= start <= end <= len(data) or end - start != count * np.dtype(np_dtype).itemsize:
            raise trust.InputError(f"{path}: tensor {name!r}: data_offsets [{start}, {end}] do not "
                                   f"hold {dtype}{shape} inside the file's {len(data)} data bytes")
        x = np.frombuffer(data, np_dtype, count, start).reshape(shape)
        out[name] = _bf16_to_f32(x) if dtype == "BF16" else x
    return out


def read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files if k != "meta"}
    except (ValueError, OSError) as e:
        raise trust.InputError(f"{path}: not a numpy .npz of arrays ({e})") from None


def read_torch(path: str):
    try:
        import torch  # noqa: PLC0415 (optional dependency, only for .pth/.pt files)
    except ImportError as e:
        raise trust.InputError(f"{path}: reading a PyTorch file needs PyTorch (pip install torch), "
                               "or convert it to .safetensors / .npz") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many types for an unreadable file)
        raise trust.InputError(f"{path}: torch.load(weights_only=True) cannot read it "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                               "save only the state dict (e.g. torch.save(ckpt['teacher'], PATH))") from None
    return _torch_to_numpy(obj, torch)


def _torch_to_numpy(obj, torch):
    if isinstance(obj, Mapping):
        return {str(k): _torch_to_numpy(v, torch) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        return (t.to(torch.float32) if t.is_floating_point() else t).numpy()
    return obj
