"""A stand-in for torch with the plug-in backend npu registered, answering as torch does once torch_npu loaded.

STUB_NPU_COUNT: how many npu devices there are (0: npu is not available).
STUB_TORCH_IMPORT_ERROR: set, importing this torch fails with that message, as a broken install does.
"""
import os
import types

if "STUB_TORCH_IMPORT_ERROR" in os.environ:
    raise ImportError(os.environ["STUB_TORCH_IMPORT_ERROR"])

_count = int(os.environ.get("STUB_NPU_COUNT", "0"))


class _C:
    @staticmethod
    def _get_privateuse1_backend_name():
        return "npu"  # torch.utils.rename_privateuse1_backend("npu"), as the plug-in does


# torch._register_device_module("npu", ...): the module torch's _get_custom_mod_func finds
npu = types.SimpleNamespace(is_available=lambda: _count > 0, device_count=lambda: _count)
