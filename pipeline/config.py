"""Load and check an extraction config before any work starts.

The JSON schema (`config.schema.yaml`, also used by the Snakefile through
`snakemake.utils.validate`) catches wrong keys and types; the checks here catch what a schema
cannot: unknown timm models and layers, weights files that do not exist, credentials in
object-store URLs.  Every failure is one line naming the offending value.
"""

from __future__ import annotations

import copy
import hashlib
import json
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import fsspec
import jsonschema
import yaml

from pipeline.endpoints import unreachable_message
from storage_specs.provenance import package_versions, redact_url

SCHEMA_PATH = Path(str(resources.files("pipeline") / "config.schema.yaml"))


# What a command that reads a finished store needs of the config (extraction needs the schema's).
REQUIRED = {"train": ["store", "training"], "sample": ["store"]}


# fsspec filesystems that take credentials only from the environment or their own config files:
# a user:password@ in such a URL is never used (s3fs would read it as part of the bucket name), and
# the first error message would repeat it into Snakemake's log.
_ENV_CREDENTIAL_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line."""


def check_url(what: str, url: str) -> None:
    """Refuse an object-store URL with credentials in it (without repeating them)."""
    parts = urlsplit(url)
    if parts.scheme.lower() in _ENV_CREDENTIAL_SCHEMES and "@" in parts.netloc:
        raise ConfigError(
            f"{what}: credentials in {parts.scheme}:// URLs are not supported; give them through "
            "the environment or the provider's config files (s3: AWS_ACCESS_KEY_ID, ...)"
        )


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _with_defaults(validator_class):
    """jsonschema validator that fills `default`s while it walks the config (like snakemake's)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def fill(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    # YAML's `4.0` is a float: JSON Schema would call it an integer, and it would reach range(),
    # torch.set_num_threads and the zarr shapes as a float
    whole = validator_class.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    )
    return jsonschema.validators.extend(validator_class, {"properties": fill}, type_checker=whole)


def _where(error: jsonschema.ValidationError) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path]
    where = "".join(parts).lstrip(".")
    return f"config {where}" if where else "config"


def validate_config(config: dict, purpose: str = "extract", remember: bool = False) -> dict:
    """A copy of `config` with defaults filled, or ConfigError naming the first bad key/value.

    For `purpose="train"` only `store` and `training` are required and no backbone is looked at:
    training reads the store alone (a config may be nothing but those two keys); `"sample"`
    (sampling, evaluation, report, analyses) needs the store and a model to read; `"finalize"`
    checks the whole schema but, like those, builds no backbone (the plan job did).
    `remember` (Snakemake's own process) keeps the verdict on the models and layers in
    `work_dir/checked-backbones`: the next `snakemake` of the same backbones, with the same featinv
    code, timm and torch, skips importing timm and building the models (seconds of every start).
    """
    config = copy.deepcopy(config)
    schema = load_schema()
    schema["required"] = REQUIRED.get(purpose, schema["required"])
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        raise ConfigError(f"{_where(error)}: {error.message}")
    for key in ("source", "store"):
        if key in config:
            check_url(f"config {key}", config[key])
    for key in ("scale", "ratio"):  # random crops draw between the two
        low, high = config.get("views", {}).get(key, (0, 0))
        if low > high:
            raise ConfigError(f"config views.{key}: [{low}, {high}] must be [low, high]")
    _check_ood(config.get("robustness", {}).get("ood", []))
    if purpose != "extract":  # only extraction builds the backbones: the rest reads the store
        return config
    verdicts = Path(config["work_dir"]) / "checked-backbones" if remember else None
    _check_backbones(config["backbones"], verdicts)
    _check_targets(config["targets"], {entry["name"] for entry in config["backbones"]})
    return config


# The code that judges models and layers: its source names a verdict (see `_verdict_name`).
JUDGES = tuple(Path(__file__).resolve().parents[1] / pkg for pkg in ("pipeline", "storage_specs"))
# The forms of a backbone's `weights` (loaded by pipeline.weights).
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
ACCEPTED = (
    "'random', 'pretrained', 'hf-hub:<repo_id>', 'package:<name>', or a local path / fsspec URL "
    f"ending in {', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
)


def weights_kind(weights: str) -> str:
    """Which accepted form ``weights`` has; ValueError naming it otherwise."""
    if weights in ("random", "pretrained"):
        return weights
    for prefix in ("hf-hub:", "package:"):
        if weights.startswith(prefix) and len(weights) > len(prefix):
            return prefix
    if weights.lower().endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES):
        return "path"
    raise ValueError(f"unknown weights {weights!r}; accepted: {ACCEPTED}")


def _check_backbones(backbones: list[dict], verdicts: Path | None = None) -> None:
    for i, entry in enumerate(backbones):  # before torch and timm, whose import costs seconds
        _check_weights(f"config backbones[{i}].weights", entry["weights"])
    _check_unique("backbones", [entry["name"] for entry in backbones])
    passed = verdicts / _verdict_name(backbones) if verdicts else None
    if passed is not None and passed.exists():
        return
    _check_models(backbones)
    if passed is not None:
        passed.parent.mkdir(parents=True, exist_ok=True)
        passed.touch()


def _verdict_name(backbones: list[dict]) -> str:
    """The entries and what judged them: a verdict holds for exactly these. featinv's code is
    hashed, not its version, which does not change with every commit of a checkout."""
    versions = package_versions(("timm", "torch", "featinv-codecs"))
    digest = hashlib.sha256(json.dumps([backbones, versions], sort_keys=True).encode())
    for path in sorted(path for judge in JUDGES for path in judge.glob("*.py")):  # ms: no import
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _check_models(backbones: list[dict]) -> None:
    """Known timm models whose named layers emit what the store holds, and compression settings
    that build."""
    import timm

    from pipeline.backbones import BackboneSpec, check_layouts
    from storage_specs.codecs import compression_codecs

    for i, entry in enumerate(backbones):
        name = entry["name"]
        if not timm.is_model(name):
            raise ConfigError(f"config backbones[{i}].name: unknown timm model '{name}'")
        try:
            check_layouts(BackboneSpec.from_config(entry))
        except ValueError as exc:
            raise ConfigError(f"config backbones[{i}].layers: {exc}") from None
        except RuntimeError as exc:  # timm's create_model: an unknown pretrained tag, ...
            raise ConfigError(f"config backbones[{i}].name: {exc}") from None
        try:
            compression_codecs(entry["compression"], "float32")
        except ValueError as exc:
            raise ConfigError(f"config backbones[{i}].compression: {exc}") from None


def _check_weights(where: str, weights: str) -> None:
    """A weights string of a known form; a path or URL must exist (hub ids and timm's pretrained
    tags are looked up by the job that downloads them)."""
    try:
        kind = weights_kind(weights)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if kind != "path":
        return
    check_url(where, weights)
    try:
        fs, path = fsspec.core.url_to_fs(weights)
    except (ValueError, ImportError) as exc:  # "Protocol not known", a filesystem not installed
        raise ConfigError(f"{where}: {redact_url(weights)}: {exc}") from None
    try:
        found = fs.exists(path)
    except Exception as exc:
        message = unreachable_message(exc)
        if message is None:
            raise
        raise ConfigError(f"{where}: {message}") from None
    if not found:
        raise ConfigError(f"{where}: weights file '{redact_url(weights)}' does not exist")


def _check_ood(collections: list[dict]) -> None:
    for i, entry in enumerate(collections):
        check_url(f"config robustness.ood[{i}].source", entry["source"])
    _check_unique("robustness.ood", [entry["name"] for entry in collections])


def _check_unique(where: str, names: list[str]) -> None:
    """Entries of a config list are told apart by name (store groups, output folders)."""
    seen = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(f"config {where}[{i}].name: '{name}' is listed twice")
        seen.add(name)


def _check_targets(targets: list[dict], taken: set[str]) -> None:
    for i, entry in enumerate(targets):
        if entry["name"] in taken:
            raise ConfigError(f"config targets[{i}].name: '{entry['name']}' is already used")
        taken.add(entry["name"])
        if entry["kind"] == "vae" and not entry.get("model"):
            raise ConfigError(f"config targets[{i}]: a vae target needs 'model' (hub id or folder)")


def load_config(path: str | Path, purpose: str = "extract") -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:  # a folder, unreadable, not text
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"config file '{path}' cannot be read: {reason}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"config file '{path}' is not valid YAML: {exc}".splitlines()[0]
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping, got {type(raw).__name__}")
    return validate_config(raw, purpose)


def with_credentials(uri: str, source: str) -> str:
    """Put back the credentials of the config's `source` into a URI stored without them."""
    public = redact_url(source)
    return uri.replace(public, source, 1) if public != source else uri


def public_config(config: dict) -> dict:
    """The config as recorded in a store: URLs without credentials."""
    config = copy.deepcopy(config)
    for key in ("source", "store"):
        config[key] = redact_url(config[key])
    return config


def groups_of(config: dict) -> dict[str, list[str]]:
    """Encoder (backbone and target) names per job group, in config order."""
    groups: dict[str, list[str]] = {}
    for entry in config["backbones"] + config["targets"]:
        groups.setdefault(entry["group"], []).append(entry["name"])
    return groups


def stage_groups(config: dict, stage: str) -> list[str]:
    """The groups a Snakemake stage waits for: `features` (backbones) or `latents` (targets)."""
    entries = config["backbones"] if stage == "features" else config["targets"]
    return sorted({entry["group"] for entry in entries})
