"""Neural Mixed Effects: person-generic θ̄ plus person-specific θⁱ for any PyTorch module."""

from nme.artifact import ArtifactError
from nme.base import load_estimator
from nme.estimators import NMEClassifier, NMERegressor
from nme.personalize import EffectsLayout, PersonalizedModule, resolve_placement
from nme.persons import UNKNOWN, PersonTable
from nme.sequence import NMESequenceTagger

__all__ = [
    "UNKNOWN",
    "ArtifactError",
    "EffectsLayout",
    "NMEClassifier",
    "NMERegressor",
    "NMESequenceTagger",
    "PersonTable",
    "PersonalizedModule",
    "load_estimator",
    "resolve_placement",
]
