"""Deployment settings, read from the environment (DESIGN.md Part 1).

Every setting has a matching environment variable; the CLI's flags override them.
Secrets are ``SecretStr`` so they never appear in logs or reprs.
"""

from __future__ import annotations

import ssl
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import Topics

ModelProfile = Literal["tiny", "toy", "random", "pretrained"]


class Settings(BaseSettings):
    """All settings of one genseg process."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092", validation_alias="KAFKA_BOOTSTRAP_SERVERS"
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", validation_alias="KAFKA_SECURITY_PROTOCOL"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, validation_alias="KAFKA_SASL_MECHANISM"
    )
    kafka_sasl_username: str | None = Field(default=None, validation_alias="KAFKA_SASL_USERNAME")
    kafka_sasl_password: SecretStr | None = Field(
        default=None, validation_alias="KAFKA_SASL_PASSWORD"
    )
    kafka_ssl_cafile: str | None = Field(default=None, validation_alias="KAFKA_SSL_CAFILE")
    kafka_ssl_certfile: str | None = Field(default=None, validation_alias="KAFKA_SSL_CERTFILE")
    kafka_ssl_keyfile: str | None = Field(default=None, validation_alias="KAFKA_SSL_KEYFILE")
    #: How long a fetch may wait on the broker for new records. A waiting consumer sends
    #: one empty fetch per wait, and each costs CPU in its process and in the broker; on
    #: tansu a longer wait also delays the hop (p50 measured: 2 ms at 10, 3-4 ms at 25,
    #: 6-8 ms at 50). 25 ms halves the cost of idle polling for 1-2 ms a hop (see "Idle
    #: polling" in docs/benchmarks.md); Apache Kafka answers as soon as records arrive.
    kafka_fetch_max_wait_ms: int = Field(
        default=25, ge=1, le=60_000, validation_alias="KAFKA_FETCH_MAX_WAIT_MS"
    )
    #: The fetch wait of a consumer that has read nothing for ``KAFKA_FETCH_IDLE_AFTER_MS``
    #: (workers, subscribers and the gateway's view; plumbing.fetch_wait): an idle
    #: consumer and the broker then wake 20 times a second instead of 40. On tansu the
    #: first record after such a lull is read 1-3 ms later at 50 (about 20 ms later at
    #: 100 or more); Apache Kafka answers at once, so raise it there. At or under
    #: ``KAFKA_FETCH_MAX_WAIT_MS``: no lengthening.
    kafka_fetch_idle_wait_ms: int = Field(
        default=50, ge=1, le=60_000, validation_alias="KAFKA_FETCH_IDLE_WAIT_MS"
    )
    #: How long a consumer reads nothing before its fetches wait ``KAFKA_FETCH_IDLE_WAIT_MS``:
    #: four empty fetches at the 25 ms wait (docs/design-notes.md says why not longer).
    kafka_fetch_idle_after_ms: int = Field(
        default=100, ge=0, le=3_600_000, validation_alias="KAFKA_FETCH_IDLE_AFTER_MS"
    )
    #: How long a worker's group waits for its heartbeat before giving its partitions to
    #: another member: a crashed worker's requests wait this long. On tansu every group
    #: join also completes only after half of it (Apache Kafka waits
    #: ``group.initial.rebalance.delay.ms``, 3 s by default, and refuses sessions under
    #: ``group.min.session.timeout.ms``, 6 s by default).
    kafka_session_timeout_ms: int = Field(
        default=10_000, ge=3_000, le=1_800_000, validation_alias="KAFKA_SESSION_TIMEOUT_MS"
    )
    kafka_ssl_check_hostname: bool = Field(
        default=True, validation_alias="KAFKA_SSL_CHECK_HOSTNAME"
    )

    topic_prefix: str = Field(
        default="genseg", pattern=r"^[A-Za-z0-9._-]{1,100}$", validation_alias="GENSEG_TOPIC_PREFIX"
    )
    blob_url: str = Field(default="./genseg-blobs", validation_alias="GENSEG_BLOB_URL")
    #: How long blobs are kept: ``genseg blobs gc`` deletes a request's blobs once all of
    #: them are older (``7d``, ``12h``, ``30m``, ``45s``); unset: kept forever.
    blob_ttl: str | None = Field(
        default=None, pattern=r"^\s*\d+\s*[smhdw]\s*$", validation_alias="GENSEG_BLOB_TTL"
    )
    #: Server-side encryption of every S3 blob write: ``AES256`` (SSE-S3) or ``aws:kms``.
    s3_sse: Literal["AES256", "aws:kms"] | None = Field(
        default=None, validation_alias="GENSEG_S3_SSE"
    )
    #: The KMS key of ``GENSEG_S3_SSE=aws:kms`` (id, alias or ARN); unset: the bucket's.
    s3_kms_key_id: str | None = Field(default=None, validation_alias="GENSEG_S3_KMS_KEY_ID")
    #: Largest image (width x height) a worker decodes; guards against decompression bombs.
    max_image_pixels: int = Field(
        default=4096 * 4096, ge=64 * 64, validation_alias="GENSEG_MAX_IMAGE_PIXELS"
    )

    models: ModelProfile = Field(default="tiny", validation_alias="GENSEG_MODELS")
    sd_model: str = Field(
        default="stable-diffusion-v1-5/stable-diffusion-v1-5", validation_alias="SD_MODEL"
    )
    sd_inpaint_model: str = Field(
        default="stable-diffusion-v1-5/stable-diffusion-inpainting",
        validation_alias="SD_INPAINT_MODEL",
    )
    #: The ``toy`` profile's generator: a diffusers directory; None: the shipped weights
    #: (toy/weights/sd, made by ``python -m toy.train_gen``).
    toy_sd_model: str | None = Field(default=None, validation_alias="TOY_SD_MODEL")
    #: The ``toy`` profile's scene generator (views of scene requests): a diffusers
    #: directory; None: the shipped weights (toy/weights/scene_sd, made by
    #: ``python -m toy.train_scene``); ``none``: the generator draws scene views too.
    toy_scene_sd_model: str | None = Field(default=None, validation_alias="TOY_SCENE_SD_MODEL")
    sam_model: Literal["vit_h", "vit_l", "vit_b"] = Field(
        default="vit_h", validation_alias="SAM_MODEL"
    )
    sam_checkpoint: str | None = Field(default=None, validation_alias="SAM_CHECKPOINT")
    #: The precision segment-anything runs in (autocast over fp32 weights): ``auto`` is
    #: bf16 on CUDA (fp16 where the GPU lacks bf16) and fp32 on the CPU.
    seg_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", validation_alias="GENSEG_SEG_DTYPE"
    )
    #: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
    device: str = Field(default="auto", validation_alias="GENSEG_DEVICE")
    #: xFormers memory-efficient attention on CUDA (needs the ``gpu`` extra); else SDPA.
    xformers: bool = Field(default=False, validation_alias="GENSEG_XFORMERS")
    #: CUDA's fast path: fuse the UNet's attention projections, ``torch.compile`` it and
    #: SAM's image encoder (slow first batches).
    torch_compile: bool = Field(default=False, validation_alias="GENSEG_TORCH_COMPILE")
    #: Byte-identical images alone or batched; None: on for CPU, off for CUDA.
    batch_invariant: bool | None = Field(default=None, validation_alias="GENSEG_BATCH_INVARIANT")
    #: A diffusers config directory for offline ``from_single_file`` loading of SD_MODEL.
    sd_model_config: str | None = Field(default=None, validation_alias="SD_MODEL_CONFIG")
    #: Depth model of scene views with the ``pretrained`` profile: a Hugging Face id or a local
    #: directory holding a DepthAnythingForDepthEstimation or DPTForDepthEstimation model.
    depth_model: str = Field(
        default="depth-anything/Depth-Anything-V2-Small-hf", validation_alias="DEPTH_MODEL"
    )
    #: The generator's request policy: a TOML file, reloaded when it changes (docs/policy.md).
    policy: str | None = Field(default=None, validation_alias="GENSEG_POLICY")
    #: diffusers' StableDiffusionSafetyChecker (a Hugging Face id or a local directory)
    #: for the policy's image check; pretrained profile only (docs/policy.md).
    safety_checker: str | None = Field(default=None, validation_alias="GENSEG_SAFETY_CHECKER")

    #: The generator's architecture for the ``tiny`` and ``random`` profiles (``pretrained``
    #: recognises an SDXL checkpoint by itself).
    sd_arch: Literal["sd15", "sdxl"] = Field(default="sd15", validation_alias="GENSEG_SD_ARCH")
    #: LoRA adapters a request may name: one ``{name}.safetensors`` or ``{name}/`` each.
    lora_dir: str | None = Field(default=None, validation_alias="GENSEG_LORA_DIR")
    #: Most adapters one request may apply on this worker.
    max_loras: int = Field(default=4, ge=1, le=10, validation_alias="GENSEG_MAX_LORAS")
    #: The segmenter's backend: segment-anything (``sam``), SAM 2.1 (``sam2``) or SAM 3.
    segmenter: Literal["sam", "sam2", "sam3"] = Field(
        default="sam", validation_alias="GENSEG_SEGMENTER"
    )
    #: SAM 2.1 and SAM 3 checkpoints of the ``pretrained`` profile: a hub id or a directory.
    sam2_model: str = Field(default="facebook/sam2.1-hiera-large", validation_alias="SAM2_MODEL")
    sam3_model: str = Field(default="facebook/sam3", validation_alias="SAM3_MODEL")

    #: HMAC-SHA256 key of the webhook signatures (``X-Genseg-Signature``); without it the
    #: dispatcher refuses to start (an unsigned webhook cannot be trusted by its receiver).
    webhook_secret: SecretStr | None = Field(default=None, validation_alias="GENSEG_WEBHOOK_SECRET")
    #: Webhook destinations allowed although internal (loopback, private...): hosts or
    #: CIDRs, comma-separated (webhook_worker.targets).
    webhook_allow: str | None = Field(default=None, validation_alias="GENSEG_WEBHOOK_ALLOW")
    #: The gateway's API keys: a file mapping keys to tenants (docs/gateway.md); unset:
    #: the gateway is open.
    api_keys: str | None = Field(default=None, validation_alias="GENSEG_API_KEYS")

    @field_validator("s3_kms_key_id")
    @classmethod
    def _kms_key_needs_kms(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value and info.data.get("s3_sse") != "aws:kms":
            raise ValueError("a KMS key needs GENSEG_S3_SSE=aws:kms")
        return value

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    def kafka_kwargs(self) -> dict[str, Any]:
        """Connection keyword arguments shared by aiokafka producers, consumers and admins.

        Build clients with :mod:`plumbing.kafka`, which also keeps the SASL password out
        of aiokafka's debug logs.
        """
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap_servers,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_context"] = self.ssl_context()
        if self.kafka_security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.kafka_sasl_mechanism or "PLAIN"
            kwargs["sasl_plain_username"] = self.kafka_sasl_username
            if self.kafka_sasl_password is not None:
                kwargs["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value()
        return kwargs

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.kafka_ssl_cafile)
        context.check_hostname = self.kafka_ssl_check_hostname
        if self.kafka_ssl_certfile:
            context.load_cert_chain(self.kafka_ssl_certfile, self.kafka_ssl_keyfile)
        return context
