"""Secrets kept out of results: any config value whose key names a secret (`api_key`, `hf_token`, `client_secret`,
`password`, a bare `key` or `token`) is written as REDACTED in metrics.json, Hydra's .hydra/*.yaml and
multirun.yaml, run.log and the config given to wandb. Knobs that merely mention tokens (`token_budget`,
`max_tokens`, `gen_tokens_per_s`) are not secrets and are left alone."""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REDACTED = "REDACTED"
SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"}


def is_secret(name: str) -> bool:
    """Does config key `name` (possibly dotted, `target.api_key`) name a secret? Its last word (split at `_`, `-`)
    is key/token/secret/password/..., or it contains `secret` or `password` anywhere."""
    last = str(name).rsplit(".", 1)[-1].lower().lstrip("+~")
    words = [w for w in re.split(r"[_\-]", last) if w]
    return bool(words) and (words[-1] in SECRET_WORDS or "secret" in last or "password" in last)


def redact(value: Any) -> Any:
    """A copy of a config (mappings, lists, Hydra override strings) with every secret value replaced."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if is_secret(k) and v not in (None, "", REDACTED) and not isinstance(v, Mapping)
                    else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_override(value)
    return value


def redact_override(text: str) -> str:
    """`target.api_key=abc` -> `target.api_key=REDACTED` (a Hydra override, or a command line's argument)."""
    m = re.fullmatch(r"([+~]{0,2}[\w.\-/@]+)=(.*)", text, flags=re.S)
    if m and is_secret(m[1]) and m[2] not in ("", "null", "None", REDACTED):
        return f"{m[1]}={REDACTED}"
    return text


def redact_text(text: str, secrets: list[str]) -> str:
    """`text` with each of `secrets` (the values themselves) replaced, for logs."""
    for s in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(s, REDACTED)
    return text


def secret_values(value: Any) -> list[str]:
    """The secret values in a config (to scrub them from free text)."""
    if isinstance(value, Mapping):
        out = []
        for k, v in value.items():
            if is_secret(k) and isinstance(v, (str, int)) and not isinstance(v, bool) and v not in ("", REDACTED):
                out.append(str(v))
            else:
                out += secret_values(v)
        return out
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in secret_values(v)]
    if isinstance(value, str):
        m = re.fullmatch(r"([+~]{0,2}[\w.\-/@]+)=(.*)", value, flags=re.S)
        return [m[2]] if m and is_secret(m[1]) and m[2] not in ("", "null", "None", REDACTED) else []
    return []


def redact_files(directory: str | Path, secrets: list[str] = ()) -> list[Path]:
    """Rewrites Hydra's YAMLs (.hydra/config.yaml, overrides.yaml, hydra.yaml and a sweep's multirun.yaml) and
    run.log in `directory` without secrets; the files it changed."""
    from omegaconf import OmegaConf

    d = Path(directory)
    changed = []
    for path in [*(d / ".hydra").glob("*.yaml"), d / "multirun.yaml"]:
        if not path.is_file():
            continue
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        found = secret_values(loaded)
        clean = redact(loaded)
        if clean != loaded:
            text = OmegaConf.to_yaml(OmegaConf.create(clean))
            path.write_text(redact_text(text, [*found, *secrets]))
            changed.append(path)
        secrets = [*secrets, *found]
    log = d / "run.log"
    if log.is_file() and secrets:
        text = log.read_text()
        clean = redact_text(text, list(secrets))
        if clean != text:
            log.write_text(clean)
            changed.append(log)
    return changed
