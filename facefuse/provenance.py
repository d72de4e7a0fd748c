"""XMP provenance metadata: declare fused images as AI-composited (IPTC digital source type) and read it back."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from xml.sax.saxutils import quoteattr

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"

NS_X = "adobe:ns:meta/"
NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
NS_XMP = "http://ns.adobe.com/xap/1.0/"
NS_IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
# The project's own namespace; only its URI identifies it, the "facefuse" prefix is a convention.
NS_FACEFUSE = "urn:facefuse:xmp:1.0/"

_XMP_START = b"<x:xmpmeta"
_XMP_END = b"</x:xmpmeta>"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_MAX_PACKET = 1 << 20  # a provenance packet is a few hundred bytes; refuse to parse megabytes


def build_xmp(watermark_id_hex: str, software: str, extra: dict[str, str] | None = None) -> bytes:
    """A UTF-8 XMP packet: IPTC DigitalSourceType, xmp:CreatorTool and facefuse:* fields (AIGenerated, WatermarkId,
    plus ``extra`` as facefuse:<key>). Keys of ``extra`` must be XML names (ValueError otherwise)."""
    fields: dict[str, str] = {"AIGenerated": "True", "WatermarkId": watermark_id_hex}
    for key, value in (extra or {}).items():
        if not _NAME_RE.match(key) or ":" in key:
            raise ValueError(f"XMP field name {key!r} is not a valid XML name")
        fields[key] = str(value)
    attributes = [
        f"Iptc4xmpExt:DigitalSourceType={quoteattr(DIGITAL_SOURCE_TYPE)}",
        f"xmp:CreatorTool={quoteattr(software)}",
        *(f"facefuse:{key}={quoteattr(value)}" for key, value in fields.items()),
    ]
    joined = "\n    ".join(attributes)
    packet = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        f'<x:xmpmeta xmlns:x="{NS_X}">\n'
        f' <rdf:RDF xmlns:rdf="{NS_RDF}">\n'
        '  <rdf:Description rdf:about=""\n'
        f'    xmlns:Iptc4xmpExt="{NS_IPTC_EXT}"\n'
        f'    xmlns:xmp="{NS_XMP}"\n'
        f'    xmlns:facefuse="{NS_FACEFUSE}"\n'
        f"    {joined}/>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="r"?>'
    )
    return packet.encode("utf-8")


def _find_packet(data: bytes) -> bytes | None:
    """The <x:xmpmeta> element. JPEG APP1, uncompressed PNG iTXt and the WebP XMP chunk store it verbatim, so a byte
    search finds it; only a zlib-compressed PNG iTXt needs Pillow's PNG header parser to inflate it."""
    start = data.find(_XMP_START)
    if start >= 0:
        end = data.find(_XMP_END, start)
        return data[start:end + len(_XMP_END)] if end >= 0 else None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    try:
        from PIL import PngImagePlugin

        # The plugin class directly, not Image.open: header chunks only, no pixel decoding, no bomb warnings.
        with PngImagePlugin.PngImageFile(io.BytesIO(data)) as im:
            value = im.info.get("XML:com.adobe.xmp") or im.info.get("xmp")
    except Exception:  # noqa: BLE001 - an unreadable PNG has no provenance
        return None
    if isinstance(value, str):
        value = value.encode("utf-8")
    start = value.find(_XMP_START) if value else -1
    end = value.find(_XMP_END, start) if start >= 0 else -1
    return value[start:end + len(_XMP_END)] if end >= 0 else None


def _lookup(root: ET.Element, namespace: str, name: str) -> str | None:
    """A property written either as an attribute or as a simple child element of any rdf:Description."""
    tag = f"{{{namespace}}}{name}"
    for description in root.iter(f"{{{NS_RDF}}}Description"):
        if tag in description.attrib:
            return description.attrib[tag]
        child = description.find(tag)
        if child is not None:
            resource = child.attrib.get(f"{{{NS_RDF}}}resource")  # URI values may be rdf:resource references
            return resource if resource is not None else (child.text or "").strip()
    return None


def read_provenance(data: bytes) -> dict | None:
    """{"digital_source_type", "watermark_id", "creator_tool"} (each str or None) from the XMP packet of JPEG/PNG/WebP
    bytes; None when there is no parseable XMP packet or it carries none of these fields."""
    packet = _find_packet(data)
    if packet is None or len(packet) > _MAX_PACKET or b"<!DOCTYPE" in packet or b"<!ENTITY" in packet:
        return None  # no entity expansion on untrusted XML
    try:
        root = ET.fromstring(packet)
    except ET.ParseError:
        return None
    result = {
        "digital_source_type": _lookup(root, NS_IPTC_EXT, "DigitalSourceType"),
        "watermark_id": _lookup(root, NS_FACEFUSE, "WatermarkId"),
        "creator_tool": _lookup(root, NS_XMP, "CreatorTool"),
    }
    return result if any(value is not None for value in result.values()) else None
