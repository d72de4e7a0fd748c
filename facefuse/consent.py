"""The consent policy of a deployment: preprocess parameter `consent`, checked against OPTIONS `consent`.

    off            nothing is asked (local demos, the local server)
    required       OPTIONS must carry "consent": true
    token:<value>  OPTIONS must carry "consent": "<value>" (a secret the operator hands to vetted front ends)

A refused request gets CONSENT_REQUIRED before any image is decoded, so no face is processed without consent.
Neither the configured token nor the one sent is ever echoed in a message.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from facefuse.errors import CONSENT_REQUIRED, FusionError

MODES = ("off", "required", "token")


@dataclass(frozen=True)
class ConsentPolicy:
    mode: str = "off"
    token: str = ""

    @classmethod
    def parse(cls, text: str | None) -> ConsentPolicy:
        """`off` (also empty), `required` or `token:<value>`; anything else is a configuration error."""
        value = (text or "").strip()
        if value in ("", "off"):
            return cls()
        if value == "required":
            return cls("required")
        if value.startswith("token:") and value[len("token:"):]:
            return cls("token", value[len("token:"):])
        raise ValueError(f"consent must be 'off', 'required' or 'token:<value>', got {value.split(':')[0]!r}...")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def describe(self) -> str:
        """For the server log: the mode, never the token."""
        return self.mode

    def check(self, consent: bool | str) -> None:
        """Raise CONSENT_REQUIRED unless OPTIONS `consent` satisfies the policy."""
        if self.mode == "required" and consent is not True:
            raise FusionError(CONSENT_REQUIRED, "this service fuses a face only with the consent of the person "
                                                'in the source image: send OPTIONS {"consent": true}')
        if self.mode == "token" and not (
                isinstance(consent, str)
                # Constant-time comparison: the token is a secret.
                and hmac.compare_digest(consent.encode("utf-8"), self.token.encode("utf-8"))):
            raise FusionError(CONSENT_REQUIRED, "this service fuses a face only with a valid consent token: send "
                                                'OPTIONS {"consent": "<token>"} with the token you were given')
