"""Subject models: the frozen causal LMs a lens looks into."""

from jaxlens.decoder import Decoder
from jaxlens.models.families import SUPPORTED, Family, family_of
from jaxlens.models.loading import load_embedded_default, load_model
from jaxlens.models.subject import Forward, SubjectModel

__all__ = [
    "SUPPORTED",
    "Decoder",
    "Family",
    "Forward",
    "SubjectModel",
    "family_of",
    "load_embedded_default",
    "load_model",
]
