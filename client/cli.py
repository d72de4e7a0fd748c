"""Command line of the face_fusion client (DESIGN.md section 3)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from client.api import DEFAULT_URLS, PROTOCOLS, FusionClient, FusionServerError


def fuse_options(args: argparse.Namespace) -> dict:
    """The OPTIONS object the `fuse` flags ask for (--options first, the flags over it)."""
    options = json.loads(args.options) if args.options else {}
    for key in ("source_face", "target_face", "format", "quality", "watermark_id"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    if args.visible_label:
        options["visible_label"] = True
    # The source person's consent, for deployments that require it (preprocess parameter `consent`).
    if args.consent_token:
        options["consent"] = args.consent_token
    elif args.consent:
        options["consent"] = True
    if "format" not in options and args.out.suffix.lower() in (".png", ".webp", ".jpg", ".jpeg"):
        options["format"] = args.out.suffix.lower().lstrip(".").replace("jpg", "jpeg")
    return options


def _fuse(args: argparse.Namespace) -> int:
    options = fuse_options(args)
    try:
        source, target = args.source.read_bytes(), args.target.read_bytes()
    except OSError as error:
        print(f"error: cannot read input: {error}", file=sys.stderr)
        return 1
    client = FusionClient(args.url, args.protocol, args.timeout, api_key=args.api_key)
    started = time.perf_counter()
    try:
        result = client.fuse(source, target, args.face_degree, args.profile_degree, options)
    except FusionServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - connection problems, timeouts
        print(f"error: cannot reach the service at {client.url} over {args.protocol}: {error}", file=sys.stderr)
        return 1
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(result.image)
    if args.metadata:
        args.metadata.write_text(json.dumps(result.metadata, indent=2))
    print(f"wrote {args.out} ({len(result.image)} bytes, watermark {result.metadata.get('watermark_id')}, "
          f"{elapsed_ms:.0f} ms over {args.protocol})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from facefuse.errors import FusionError
    from facefuse.imaging import decode_image
    from facefuse.provenance import read_provenance
    from facefuse.watermark import extract_watermark

    try:
        data = args.image.read_bytes()
        reading = extract_watermark(decode_image(data, role="verified"))
    except (OSError, FusionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    report = {
        "image": str(args.image),
        "watermark_present": reading.present,
        "watermark_id": reading.watermark_id,
        "confidence": round(reading.confidence, 4),
        "provenance": read_provenance(data),
    }
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description="Face fusion client (Triton, v1).")
    commands = parser.add_subparsers(dest="command", required=True)
    fuse = commands.add_parser("fuse", help="fuse the source's face into the target")
    fuse.add_argument("--source", type=Path, required=True, help="image with the face to bring in")
    fuse.add_argument("--target", type=Path, required=True, help="image that receives the face")
    fuse.add_argument("--out", type=Path, required=True, help="where to write the fused image")
    fuse.add_argument("--face-degree", type=float, default=100.0, help="0-100, texture/features (default 100)")
    fuse.add_argument("--profile-degree", type=float, default=100.0, help="0-100, face shape (default 100)")
    fuse.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    fuse.add_argument("--url", help=f"host:port (default {DEFAULT_URLS['grpc']} gRPC, {DEFAULT_URLS['http']} HTTP)")
    fuse.add_argument("--source-face", type=int, help="face index in the source, 0 = largest")
    fuse.add_argument("--target-face", type=int, help="face index in the target, 0 = largest")
    fuse.add_argument("--format", choices=("jpeg", "png", "webp"), help="output format (default: from --out)")
    fuse.add_argument("--quality", type=int, help="JPEG/WebP quality 1-100")
    fuse.add_argument("--watermark-id", help="hex id to embed (default: random 64-bit)")
    fuse.add_argument("--visible-label", action="store_true", help="draw an 'AI-generated' label")
    consent = fuse.add_mutually_exclusive_group()
    consent.add_argument("--consent", action="store_true",
                         help="assert that the person in the source image consented (OPTIONS consent: true)")
    consent.add_argument("--consent-token", default=os.environ.get("FACEFUSE_CONSENT_TOKEN") or None,
                         help="consent token of a deployment with consent=token:... "
                              "(default: $FACEFUSE_CONSENT_TOKEN)")
    fuse.add_argument("--options", help="raw OPTIONS JSON object, merged under the flags above")
    fuse.add_argument("--metadata", type=Path, help="also write the METADATA JSON here")
    fuse.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    fuse.add_argument("--api-key", default=os.environ.get("FACEFUSE_API_KEY") or None,
                      help="API key for the gateway, sent as x-api-key (default: $FACEFUSE_API_KEY)")
    fuse.set_defaults(handler=_fuse)
    verify = commands.add_parser("verify", help="check an image for the service's watermark and provenance")
    verify.add_argument("image", type=Path)
    verify.set_defaults(handler=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
