"""Consent: the policy (preprocess parameter `consent`), OPTIONS `consent`, the client flags, and the docker config
that turns it on (configs/gpu.pbtxt, which must stay config.pbtxt in all else)."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from client.cli import build_parser, fuse_options
from facefuse.consent import ConsentPolicy
from facefuse.errors import CONSENT_REQUIRED, INVALID_OPTIONS, FusionError
from facefuse.options import MAX_CONSENT_CHARS, parse_options
from tests.conftest import REPO_ROOT

PREPROCESS = REPO_ROOT / "model_repository" / "preprocess"


def load(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("text,mode,token", [("off", "off", ""), ("", "off", ""), (None, "off", ""),
                                             ("required", "required", ""), ("token:s3cr:et", "token", "s3cr:et")])
def test_policy_parses(text, mode, token):
    policy = ConsentPolicy.parse(text)
    assert (policy.mode, policy.token) == (mode, token)
    assert policy.enabled == (mode != "off")
    assert token not in policy.describe() or not token


@pytest.mark.parametrize("text", ["on", "true", "token:", "Required", "token"])
def test_bad_policy_fails_the_load(text):
    with pytest.raises(ValueError):
        ConsentPolicy.parse(text)


def _refused(policy: ConsentPolicy, consent) -> FusionError | None:
    try:
        policy.check(consent)
    except FusionError as error:
        return error
    return None


def test_off_asks_nothing():
    for consent in (False, True, "anything"):
        assert _refused(ConsentPolicy(), consent) is None


def test_required_wants_true():
    policy = ConsentPolicy.parse("required")
    assert _refused(policy, True) is None
    for consent in (False, "true", "yes"):
        error = _refused(policy, consent)
        assert error is not None and error.code == CONSENT_REQUIRED and error.is_client_error
        assert str(error).startswith("CONSENT_REQUIRED: ") and '"consent": true' in str(error)


def test_token_wants_the_token_and_never_echoes_it():
    policy = ConsentPolicy.parse("token:opensesame-42")
    assert _refused(policy, "opensesame-42") is None
    for consent in (True, False, "opensesame-4", "opensesame-42 ", "OPENSESAME-42"):
        error = _refused(policy, consent)
        assert error is not None and error.code == CONSENT_REQUIRED
        assert "opensesame" not in str(error).lower()


def test_options_consent_values():
    assert parse_options(b"{}").consent is False
    assert parse_options(b'{"consent": true}').consent is True
    assert parse_options(b'{"consent": "tok"}').consent == "tok"
    assert "tok" not in repr(parse_options(b'{"consent": "tok"}'))  # a token never reaches a log through repr
    for raw in (b'{"consent": 1}', b'{"consent": null}', b'{"consent": ""}', b'{"consent": ["x"]}',
                b'{"consent": "' + b"x" * (MAX_CONSENT_CHARS + 1) + b'"}'):
        with pytest.raises(FusionError) as caught:
            parse_options(raw)
        assert caught.value.code == INVALID_OPTIONS


def test_preprocessor_refuses_before_decoding():
    """CONSENT_REQUIRED comes before any image work: even undecodable bytes get it, not INVALID_IMAGE."""
    from facefuse.pipeline import FusionRequest, Preprocessor

    class NoDetector:
        def detect_batch(self, images):
            assert not images, "no image may be decoded or detected without consent"
            return []

    preprocessor = Preprocessor(NoDetector(), mesh=None, consent=ConsentPolicy.parse("required"))
    results = preprocessor.prepare_batch([FusionRequest(b"junk", b"junk", 50, 50, b"{}"),
                                          FusionRequest(b"junk", b"junk", 50, 50, b'{"consent": false}')])
    assert [result.code for result in results] == [CONSENT_REQUIRED, CONSENT_REQUIRED]


@pytest.mark.parametrize("flags,expected", [([], None), (["--consent"], True), (["--consent-token", "T1"], "T1")])
def test_client_flags(flags, expected, monkeypatch):
    monkeypatch.delenv("FACEFUSE_CONSENT_TOKEN", raising=False)
    args = build_parser().parse_args(["fuse", "--source", "s.jpg", "--target", "t.jpg", "--out", "o.png", *flags])
    assert fuse_options(args).get("consent") == expected


def test_client_token_from_the_environment(monkeypatch):
    monkeypatch.setenv("FACEFUSE_CONSENT_TOKEN", "from-env")
    args = build_parser().parse_args(["fuse", "--source", "s.jpg", "--target", "t.jpg", "--out", "o.png"])
    assert fuse_options(args)["consent"] == "from-env"


def test_consent_flags_are_exclusive():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fuse", "--source", "s", "--target", "t", "--out", "o", "--consent",
                                   "--consent-token", "x"])


def test_local_config_has_consent_off_and_no_blocklist():
    parameters = {key: value.string_value for key, value in load(PREPROCESS / "config.pbtxt").parameters.items()}
    assert parameters["consent"] == "off"  # local demos and the local server
    assert parameters["blocklist_path"] == ""


def test_docker_config_is_the_local_one_with_consent_required():
    """docker compose starts Triton with --model-config-name=gpu, so preprocess/configs/gpu.pbtxt replaces
    config.pbtxt whole: it must be a full copy, differing only in `consent`, its instance count, its threads per
    instance and its batching delay."""
    local, gpu = load(PREPROCESS / "config.pbtxt"), load(PREPROCESS / "configs" / "gpu.pbtxt")
    assert gpu.parameters["consent"].string_value == "required"
    ConsentPolicy.parse(gpu.parameters["consent"].string_value)
    del local.parameters["consent"], gpu.parameters["consent"]
    del local.parameters["cpu_threads"], gpu.parameters["cpu_threads"]
    for config in (local, gpu):
        config.ClearField("instance_group")
        config.dynamic_batching.ClearField("max_queue_delay_microseconds")
    assert text_format.MessageToString(gpu) == text_format.MessageToString(local)
