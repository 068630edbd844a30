"""A study's storage from the driver's side: checked before Ray starts, and cleared for ``--overwrite``.

A local folder or an ``s3://bucket/prefix`` URI. S3 is reached with boto3 and the standard AWS settings
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile or role, AWS_DEFAULT_REGION), the ones
pyarrow, and so Ray Tune, reads too. The check fails in seconds: one attempt, a short connect timeout.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from studies.runner.errors import UsageError

CONNECT_TIMEOUT_S = 3
# what boto3 and pyarrow read to reach S3: forwarded to the trials of a cluster through Ray's runtime_env when the
# driver has them (nodes with an instance role or their own environment need none)
S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_EC2_METADATA_DISABLED")
READ_TIMEOUT_S = 10


class StorageError(UsageError):
    """A ``--storage`` the study cannot use, in one line that names it and says what to do (exit code 2)."""


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ("bucket", "a/b")."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    return bucket, prefix.strip("/")


def _client(session=None):
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                    retries={"total_max_attempts": 1})
    return (session or boto3.session.Session()).client("s3", config=config)


def _custom_endpoint() -> bool:
    return bool(os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3"))


def check_storage(storage: str) -> None:
    """Fail with a StorageError when an ``s3://`` storage lacks credentials, its bucket or a reachable endpoint.

    A local folder passes here (the disk pre-flight checks it); other schemes are left to pyarrow.
    """
    if not storage.startswith("s3://"):
        return
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    bucket, _ = split_s3(storage)
    if not bucket:
        raise StorageError(f"--storage {storage}: no bucket in the URI; write s3://BUCKET/PREFIX")
    session = boto3.session.Session()
    client = _client(session)
    endpoint = client.meta.endpoint_url
    missing = (f"--storage {storage}: no AWS credentials for bucket {bucket} at {endpoint}: set AWS_ACCESS_KEY_ID "
               "and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) where the driver runs and on every node")
    if session.get_credentials() is None:  # boto3's own lookup: environment, profile, instance role
        raise StorageError(missing)
    try:
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise StorageError(missing) from None
    except EndpointConnectionError:
        advice = ("start the server or point AWS_ENDPOINT_URL at one that is up" if _custom_endpoint() else
                  "check this machine's network, or set AWS_ENDPOINT_URL for another S3 server")
        raise StorageError(f"--storage {storage}: cannot reach the S3 endpoint {endpoint} (bucket {bucket}): "
                           f"{advice}") from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"--storage {storage}: bucket {bucket} does not exist at {endpoint}: create it "
                               f"(aws s3 mb s3://{bucket}) or pass another --storage") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(f"--storage {storage}: bucket {bucket} at {endpoint} refused these credentials "
                               f"({code}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the bucket's "
                               "policy") from None
        raise StorageError(f"--storage {storage}: bucket {bucket} at {endpoint} answered {code or err}") from None
    except BotoCoreError as err:  # a connect or read timeout, a malformed endpoint
        raise StorageError(f"--storage {storage}: cannot use the S3 endpoint {endpoint} (bucket {bucket}): "
                           f"{err}") from None


def remove_study(study_dir: str) -> None:
    """Delete a study: every object under an ``s3://bucket/prefix/NAME/`` prefix, or a local folder."""
    if "://" not in study_dir:
        shutil.rmtree(Path(study_dir).expanduser(), ignore_errors=True)
        return
    if not study_dir.startswith("s3://"):
        raise StorageError(f"--overwrite: cannot remove {study_dir}: only local folders and s3:// are supported")
    bucket, prefix = split_s3(study_dir)
    if not prefix:  # never a whole bucket
        raise StorageError(f"--overwrite: {study_dir} is a whole bucket, not a study's prefix")
    client = _client()
    # "NAME/": the study's objects and folder markers, never a sibling study "NAME_other/"
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    for page in pages:
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:  # a page holds at most 1,000 keys, delete_objects' own limit
            failed = client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True}).get("Errors", [])
            if failed:
                raise StorageError(f"--overwrite: {len(failed)} object(s) of {study_dir} could not be removed, e.g. "
                                   f"{failed[0].get('Key')}: {failed[0].get('Code')} {failed[0].get('Message')}")


def _filesystem(study_dir: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(study_dir if "://" in study_dir else Path(study_dir).expanduser().resolve().as_uri())


def study_exists(study_dir: str) -> bool:
    """Whether anything is stored at the study's folder or prefix."""
    from pyarrow import fs

    filesystem, path = _filesystem(study_dir)
    return filesystem.get_file_info(path).type != fs.FileType.NotFound


def has_trial_results(study_dir: str) -> bool:
    """Whether any trial of the study reported (a ``<trial>/result.json`` with content)."""
    from pyarrow import fs

    filesystem, path = _filesystem(study_dir)
    if filesystem.get_file_info(path).type == fs.FileType.NotFound:
        return False
    infos = filesystem.get_file_info(fs.FileSelector(path, recursive=True, allow_not_found=True))
    return any(info.base_name == "result.json" and info.size for info in infos)


def trial_env(storage: str) -> dict[str, str]:
    """The driver's S3 settings that trials on other nodes need to write an ``s3://`` storage (none otherwise)."""
    if not storage.startswith("s3://"):
        return {}
    return {name: os.environ[name] for name in S3_SETTINGS if os.environ.get(name)}
