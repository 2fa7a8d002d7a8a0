"""tuned-lens lens directories (`config.json` + `params.pt`) read and written without torch.

This is the only package of jaxlens that knows the PyTorch file format. A lens directory holds a
seven-key `config.json` (`schema`) and a `torch.save` archive of the translators' state dict
(`lens_dir`). We write that archive byte by byte (`writer`) and read it with an unpickler that
knows only the globals a tensor state dict needs (`unpickler`, `reader`): a `.pt` file is a
pickle, and a general unpickler runs whatever code the file names.
"""

from jaxlens.torch_format.dtypes import DTYPES
from jaxlens.torch_format.errors import LensFileError, UnsafeLensFileError
from jaxlens.torch_format.lens_dir import PARAMS_FILES, LensFile, read_lens_dir, write_lens_dir
from jaxlens.torch_format.reader import load_torch_state_dict
from jaxlens.torch_format.schema import LENS_CONFIG_KEYS, LENS_TYPE, lens_config, unembed_hash
from jaxlens.torch_format.writer import save_torch_state_dict

__all__ = [
    "DTYPES",
    "LENS_CONFIG_KEYS",
    "LENS_TYPE",
    "PARAMS_FILES",
    "LensFile",
    "LensFileError",
    "UnsafeLensFileError",
    "lens_config",
    "load_torch_state_dict",
    "read_lens_dir",
    "save_torch_state_dict",
    "unembed_hash",
    "write_lens_dir",
]
