"""GCS credentials: anonymous (the default), Application Default Credentials, a service-account key, and a
requester-pays billing project.

Against the GCS emulator wherever the request path can be exercised: a service-account key whose token
exchange a loopback endpoint answers (so google-auth really signs a JWT, gets a token and sends it), ADC
from GOOGLE_APPLICATION_CREDENTIALS pointing at that key, and ``userProject`` on every request. The rest
(ADC with nothing configured, unreadable keys) by the client construction alone; nothing leaves loopback.
"""

from __future__ import annotations

import pytest
from google.auth.credentials import AnonymousCredentials

from scin_pipeline.core.fetch import FetchRequest, fetch_images
from scin_pipeline.core.paths import CASES_OBJECT
from scin_pipeline.core.sources import (
    GCS_READ_ONLY_SCOPE,
    GcsAccess,
    GcsBucketSource,
    SourceAccessDenied,
    SourceUnreachable,
    gcs_client,
    open_source,
)
from scin_pipeline.resources import ScinSourceResource
from scin_pipeline_tests.core.test_sources import IMAGES, upload_release
from scin_pipeline_tests.gcs_emulator import FakeTokenEndpoint, write_service_account_key

SA_EMAIL = "reader@scin-test.iam.gserviceaccount.com"


@pytest.fixture
def token_endpoint():
    with FakeTokenEndpoint() as endpoint:
        yield endpoint


@pytest.fixture
def key_file(tmp_path, token_endpoint):
    return write_service_account_key(tmp_path / "reader-key.json", token_endpoint.token_uri, SA_EMAIL)


@pytest.fixture
def no_ambient_credentials(monkeypatch, tmp_path):
    """Nothing on this machine that google.auth.default could find (no env key, no gcloud config, no GCE)."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
    monkeypatch.setenv("NO_GCE_CHECK", "True")


def upload_and_mark(emulator) -> int:
    """Upload the release (through the emulator's own anonymous client); how many requests that took, so a
    test looks only at the requests its source made."""
    upload_release(emulator)
    return len(emulator.requests_seen())


# ---- the configuration's rules ---------------------------------------------------------------------


def test_anonymous_is_the_default_and_sends_no_credentials(gcs_emulator):
    uploads = upload_and_mark(gcs_emulator)
    source = GcsBucketSource()
    assert source.access == GcsAccess(auth="anonymous")
    assert isinstance(source._client._credentials, AnonymousCredentials)
    assert set(source.list("dataset/images/")) == set(IMAGES)
    seen = gcs_emulator.requests_seen()[uploads:]
    assert seen and all(r["authorization"] is None and "userProject" not in r["query"] for r in seen)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"auth": "oauth"}, "not one of anonymous, application_default, service_account_key"),
        ({"auth": "service_account_key"}, "needs service_account_key_file"),
        ({"service_account_key_file": "/k.json"}, "set auth to 'service_account_key'"),
        ({"auth": "application_default", "service_account_key_file": "/k.json"}, "set auth to 'service_account_key'"),
        ({"user_project": "billing-1"}, "needs an identity to bill"),
    ],
)
def test_inconsistent_credentials_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GcsAccess(**kwargs)


def test_cleared_fields_count_as_unset():
    assert GcsAccess(auth="anonymous", service_account_key_file="", user_project=" ") == GcsAccess()


def test_describe_names_the_credentials_and_the_billing_project():
    assert GcsAccess().describe() == "anonymous access"
    assert (
        GcsAccess("application_default", user_project="billing-1").describe()
        == "Application Default Credentials, billing project billing-1"
    )
    assert GcsAccess("service_account_key", "/keys/r.json").describe() == "service-account key /keys/r.json"


def test_a_local_mirror_refuses_gcs_credentials_instead_of_ignoring_them(tmp_path):
    with pytest.raises(ValueError, match="local folder"):
        open_source(str(tmp_path), access=GcsAccess("application_default"))
    with pytest.raises(ValueError, match="local folder"):
        ScinSourceResource(location=str(tmp_path), auth="application_default").open()


# ---- service-account key: the real google-auth path, token exchange on loopback --------------------


def test_service_account_key_reads_the_bucket_with_a_read_only_bearer_token(gcs_emulator, key_file, token_endpoint):
    uploads = upload_and_mark(gcs_emulator)
    source = ScinSourceResource(
        location="gcs", auth="service_account_key", service_account_key_file=str(key_file)
    ).open()
    assert source.access.auth == "service_account_key"

    assert set(source.list("dataset/images/")) == set(IMAGES)
    data, _ = source.read_bytes(CASES_OBJECT)
    assert data.startswith(b"case_id")

    # google-auth signed a JWT as the key's account, asking for read-only storage, and sent the token.
    assert token_endpoint.grants, "no token was requested"
    grant = token_endpoint.grants[0]
    assert grant["iss"] == SA_EMAIL
    assert grant["scope"] == GCS_READ_ONLY_SCOPE
    seen = gcs_emulator.requests_seen()[uploads:]
    assert seen and all(r["authorization"] == "Bearer token-1" for r in seen)


def test_application_default_credentials_from_google_application_credentials(
    gcs_emulator, key_file, token_endpoint, monkeypatch
):
    """ADC as google.auth.default finds them (no mock): the key named by GOOGLE_APPLICATION_CREDENTIALS."""
    uploads = upload_and_mark(gcs_emulator)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    source = GcsBucketSource(access=GcsAccess("application_default", user_project="billing-7"))
    assert set(source.list("dataset/images/")) == set(IMAGES)
    assert source._client._credentials.service_account_email == SA_EMAIL
    assert token_endpoint.grants[0]["scope"] == GCS_READ_ONLY_SCOPE
    seen = gcs_emulator.requests_seen()[uploads:]
    assert seen
    assert all(r["authorization"] == "Bearer token-1" for r in seen)
    assert all(r["query"].get("userProject") == ["billing-7"] for r in seen)


def test_a_refused_token_exchange_names_the_key_and_what_to_do(gcs_emulator, key_file, token_endpoint):
    uploads = upload_and_mark(gcs_emulator)
    token_endpoint.refuse("invalid_grant")
    source = GcsBucketSource(access=GcsAccess("service_account_key", str(key_file)))
    with pytest.raises(SourceAccessDenied) as denied:
        source.list("dataset/images/")
    message = str(denied.value)
    assert "could not be refreshed" in message and "invalid_grant" in message
    assert f"service-account key {key_file}" in message
    assert "issue a new key" in message
    assert gcs_emulator.requests_seen()[uploads:] == []  # no request reached the bucket without a token


def test_a_missing_or_malformed_key_file_is_named(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(SourceAccessDenied, match=f"key file {missing} not found"):
        gcs_client(GcsAccess("service_account_key", str(missing)))
    not_a_key = tmp_path / "user-creds.json"
    not_a_key.write_text('{"type": "authorized_user", "client_id": "x"}')
    with pytest.raises(SourceAccessDenied, match=f"{not_a_key} is not a service-account JSON key"):
        gcs_client(GcsAccess("service_account_key", str(not_a_key)))
    not_json = tmp_path / "garbage.json"
    not_json.write_text("not json {")
    with pytest.raises(SourceAccessDenied, match=f"{not_json} is not a service-account JSON key"):
        gcs_client(GcsAccess("service_account_key", str(not_json)))


# ---- Application Default Credentials: client construction ------------------------------------------


def test_adc_client_carries_what_google_auth_default_returned(monkeypatch):
    calls = []
    credentials = AnonymousCredentials()

    def fake_default(scopes=None, **kwargs):
        calls.append(scopes)
        return credentials, "adc-project"

    monkeypatch.setattr("google.auth.default", fake_default)
    client = gcs_client(GcsAccess("application_default"))
    assert calls == [[GCS_READ_ONLY_SCOPE]]
    assert client._credentials is credentials and client.project == "adc-project"


def test_no_application_default_credentials_is_explained(no_ambient_credentials):
    with pytest.raises(SourceAccessDenied) as denied:
        GcsBucketSource(access=GcsAccess("application_default"))
    message = str(denied.value)
    assert "no Application Default Credentials found" in message
    assert "gcloud auth application-default login" in message and "GOOGLE_APPLICATION_CREDENTIALS" in message
    assert isinstance(denied.value, SourceUnreachable)  # callers that stop on an unreachable source stop here


# ---- 401 / 403: which credentials, and what to try -------------------------------------------------


def adc_as(monkeypatch, credentials=None):
    monkeypatch.setattr("google.auth.default", lambda scopes=None, **kw: (credentials or AnonymousCredentials(), None))


@pytest.mark.parametrize(
    ("access", "status", "names", "advice"),
    [
        (
            GcsAccess(),
            403,
            "reading with anonymous access",
            ["must be public", "'application_default'", "user_project"],
        ),
        (
            GcsAccess("application_default", user_project="billing-1"),
            403,
            "reading with Application Default Credentials, billing project billing-1",
            ["roles/storage.objectViewer", "serviceusage.services.use"],
        ),
    ],
)
def test_access_denied_names_the_credentials_used_and_what_to_try(
    gcs_emulator, tmp_path, monkeypatch, access, status, names, advice
):
    upload_release(gcs_emulator)
    adc_as(monkeypatch)
    path = next(iter(IMAGES))
    gcs_emulator.fail_next(path, status=status)
    with pytest.raises(SourceAccessDenied) as denied:
        GcsBucketSource(access=access).download_to(path, tmp_path / "x")
    message = str(denied.value)
    assert f"access denied (HTTP {status}" in message and path in message
    assert names in message
    for words in advice:
        assert words in message


def test_service_account_403_names_the_key_file(gcs_emulator, key_file, tmp_path):
    upload_release(gcs_emulator)
    path = next(iter(IMAGES))
    gcs_emulator.fail_next(path, status=403)
    with pytest.raises(SourceAccessDenied, match=f"grant the service account in {key_file} roles/storage.objectViewer"):
        GcsBucketSource(access=GcsAccess("service_account_key", str(key_file))).download_to(path, tmp_path / "x")


def test_fetch_does_not_retry_a_denied_download(gcs_emulator, tmp_path):
    upload_release(gcs_emulator)
    path = next(iter(IMAGES))
    gcs_emulator.fail_next(path, status=403, times=5)
    [result] = fetch_images(
        GcsBucketSource(),
        [FetchRequest(path.rsplit("/", 1)[1][: -len(".png")], path)],
        tmp_path / "images",
        quarantine_dir=tmp_path / "quarantine",
        retries=3,
        backoff_s=0.0,
    )
    assert result.status == "missing" and "access denied (HTTP 403" in (result.reason or "")
    assert result.attempts == 1 and gcs_emulator.downloads(path) == 1


def test_401_after_a_fresh_token_says_the_credentials_were_not_accepted(gcs_emulator, key_file, tmp_path, monkeypatch):
    """google-auth answers a 401 by minting a new token and retrying; a 401 that persists is reported."""
    upload_release(gcs_emulator)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    path = next(iter(IMAGES))
    gcs_emulator.fail_next(path, status=401, times=5)
    with pytest.raises(SourceAccessDenied) as denied:
        GcsBucketSource(access=GcsAccess("application_default")).download_to(path, tmp_path / "x")
    message = str(denied.value)
    assert "access denied (HTTP 401" in message and "reading with Application Default Credentials" in message
    assert "not accepted" in message and "gcloud auth application-default login" in message
