"""Client of the face_fusion service (wire interface v1) over tritonclient gRPC or HTTP."""

from client.api import FusionClient, FusionResult, FusionServerError

__all__ = ["FusionClient", "FusionResult", "FusionServerError"]
