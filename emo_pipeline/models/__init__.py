"""EMO's networks: ReferenceNet, the 3D backbone and its conditioning layers (DESIGN.md section 3)."""

from emo_pipeline.models.attention import ReferenceFeatures
from emo_pipeline.models.audio_projection import AudioProjection
from emo_pipeline.models.backbone import EMOUNet3DConditionModel, parameter_group
from emo_pipeline.models.face_locator import FaceLocator
from emo_pipeline.models.reference_net import ReferenceNet
from emo_pipeline.models.speed import SpeedEncoder, speed_bucket_encoding

__all__ = [
    "AudioProjection",
    "EMOUNet3DConditionModel",
    "FaceLocator",
    "ReferenceFeatures",
    "ReferenceNet",
    "SpeedEncoder",
    "parameter_group",
    "speed_bucket_encoding",
]
