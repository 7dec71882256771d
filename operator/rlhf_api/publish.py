"""Publishing the run's result: where the merged model (and, if asked, the reward model) is uploaded.

Declared once here; the publish stage (rlhf_stages/methods/publish.py) reads it as ``spec.publish``,
the operator passes the credentials it names to that stage's Pod only (children.py), and
docs/publishing.md explains the layout of what is uploaded and how a retry resumes.
"""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import Field

from .base import ApiModel, Rule
from .runtime import DNSName, Resources, SecretKeyRef
from .stages import StageBase

# What the operator sets in the publish stage's Pod (RLHF_* names are reserved: a podTemplate cannot
# set them). The values come from the Secrets spec.publish names, never from the spec itself.
S3_ACCESS_KEY_ID_ENV: Final = "RLHF_S3_ACCESS_KEY_ID"
S3_SECRET_ACCESS_KEY_ENV: Final = "RLHF_S3_SECRET_ACCESS_KEY"
HUB_TOKEN_ENV: Final = "RLHF_HUB_TOKEN"
OPERATOR_VERSION_ENV: Final = "RLHF_OPERATOR_VERSION"
"""The operator's version, for the model card (absent outside a cluster: ``rlhfctl run-local``)."""

# Where each model goes under a target: s3://<bucket>/<prefix>/<folder>/..., or <folder>/ in a hub repo
# (the merged model at the repository's root, so the hub shows its model card).
MODEL_FOLDER: Final = "model"
REWARD_MODEL_FOLDER: Final = "reward-model"
MODEL_CARD_FILE: Final = "README.md"
PUBLISH_RECORD_FILE: Final = "rlhf-publish.json"
"""Written last beside the folders: the files and their sha256. Its presence means the upload is complete."""
SHA256_METADATA_KEY: Final = "sha256"
"""Each S3 object carries its content's sha256 as user metadata (``x-amz-meta-sha256``): a retry skips
objects whose size and sha256 already match."""

_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
# S3 bucket names: 3-63 lower-case letters, digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
# An object key prefix: no leading or trailing slash, no empty or '..' segments.
_PREFIX_PATTERN = r"^[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*$"
_PREFIX_MESSAGE = "prefix: segments of letters, digits and !_.*'()- joined by '/', without '..' (e.g. models/tiny)"


class S3Credentials(ApiModel):
    """The access key pair, by Secret reference: one Secret in the run's namespace holding both keys."""

    secret_name: DNSName
    """Secret holding the access key id and the secret access key."""
    access_key_id_key: Annotated[str, Field(min_length=1, max_length=253, pattern=_KEY_PATTERN)] = "AWS_ACCESS_KEY_ID"
    """Key within the Secret holding the access key id."""
    secret_access_key_key: Annotated[str, Field(min_length=1, max_length=253, pattern=_KEY_PATTERN)] = (
        "AWS_SECRET_ACCESS_KEY"
    )
    """Key within the Secret holding the secret access key."""


class S3Target(ApiModel):
    """An S3-compatible bucket (AWS S3, MinIO, SeaweedFS, Ceph RGW, ...)."""

    rules = (
        Rule(
            cel="!has(self.prefix) || !self.prefix.matches('(^|/)[.][.]?(/|$)')",
            message=_PREFIX_MESSAGE,
            field_path=".prefix",
            check=lambda t: t.prefix is None or not any(p in (".", "..") for p in t.prefix.split("/")),
        ),
    )

    endpoint: Annotated[str, Field(min_length=1, max_length=512, pattern=r"^https?://[^/?#\s]+/?$")] = (
        "https://s3.amazonaws.com"
    )
    """The server's URL, scheme and host (and port), e.g. ``http://seaweedfs.storage:8333``."""
    bucket: Annotated[str, Field(min_length=3, max_length=63, pattern=_BUCKET_PATTERN)]
    """The bucket; it must exist (the stage does not create buckets)."""
    prefix: Annotated[str, Field(min_length=1, max_length=512, pattern=_PREFIX_PATTERN)] | None = None
    """Key prefix the models go under. Unset: ``<namespace>/<run name>``."""
    region: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9-]+$")] = "us-east-1"
    """The bucket's region (used for request signing)."""
    credentials: S3Credentials
    """The access key pair, by Secret reference."""


class HubTarget(ApiModel):
    """A Hugging Face hub model repository (created when missing)."""

    repo_id: Annotated[str, Field(max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")]
    """Repository id, ``owner/name``."""
    revision: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")] = "main"
    """Branch to commit to (created from the default branch when missing)."""
    private: bool = True
    """Create the repository private (an existing repository keeps its visibility)."""
    token: SecretKeyRef | None = None
    """Token with write access, by Secret reference. Unset: ``spec.secrets.hfToken``."""


class PublishStage(StageBase):
    """Uploads the run's result after merge: the merged model (always) and the reward model (if asked),
    with a model card written from the run, to an S3-compatible bucket and/or a hub repository."""

    rules = (
        Rule(
            cel="has(self.s3) || has(self.hub)",
            message="publish needs a target: set s3 (a bucket) and/or hub (a repository)",
            check=lambda p: p.s3 is not None or p.hub is not None,
        ),
    )

    s3: S3Target | None = None
    """Upload to this S3-compatible bucket."""
    hub: HubTarget | None = None
    """Upload to this hub repository."""
    reward_model: bool = False
    """Upload the reward stage's model too (the run must train one)."""
    model_card: bool = True
    """Write a model card (README.md) from the run: base model, datasets, method and settings, the
    stages' evaluation metrics, the config hash and the operator's version."""
    resources: Resources = Field(default_factory=lambda: Resources(gpus=0, cpu="1", memory="2Gi"))
    """Uploading needs no GPU: files are hashed and streamed from the volume."""
