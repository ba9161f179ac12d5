"""Resume must continue the *same* training: compare the checkpoint's stored config with this one.

A changed adapter target list would resume and silently drop the trained adapters of the removed
targets; a changed MoRA type, rank or base model (`model.seed`, `model.hf_dir`, shape, dtype)
would load trained adapters onto a model they were not trained for; a different `data.eod_id`
means differently tokenized data. Layout (`parallel.*`), schedule and data blend may change on
resume (checkpoints are layout-free), so only these sections are compared. A MoRA run's type
schedule (`restarts.mora_types`) decides which grouping the adapters have after n restarts, so it is
compared too; checkpoints written before the key existed cycled [1, 2, 3, 4]. The full-rank parts
(`train.full_rank`) are compared as a set: a resume that drops one would discard its trained values,
one that adds a part would start it from the source weights (both allowed with allow_config_change).
"""
from __future__ import annotations

import os

COMPARED_SECTIONS = ("model", "adapter")
COMPARED_KEYS = (("data", "eod_id"), ("train", "full_rank"))
MORA_KEYS = (("restarts", "mora_types"),)  # compared when adapter.method is mora
LEGACY_DEFAULTS = {("restarts", "mora_types"): [1, 2, 3, 4]}  # the value of a key older checkpoints lack
RUNTIME_KEYS = (("adapter", "fast_path"),)  # how the same adapters are computed: free to change on resume


def _norm(section: str, key: str, value, method: str):
    if section == "adapter":
        from mora_dist.adapters.base import REGISTRY

        value = REGISTRY[method].config_class.canonical_value(key, value) if method in REGISTRY else value
    if section == "model" and key == "hf_dir" and value:
        return os.path.realpath(value)
    if section == "restarts" and key == "mora_types":
        from mora_dist.adapters.mora import cycle_of

        try:
            return list(cycle_of(value))
        except ValueError:
            return value
    if section == "train" and key == "full_rank":
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def config_differences(saved: dict, current) -> list[str]:
    """'section.key: saved -> current' for every compared value that differs."""
    from mora_dist.adapters.base import AdapterConfig, adapter_keys
    from mora_dist.training.config import SHAPE_KEYS, Config

    cur = current.to_dict()
    default = Config(adapter=AdapterConfig(cur["adapter"]["method"])).to_dict()
    if isinstance(saved.get("adapter"), dict) and saved["adapter"].get("method") == cur["adapter"]["method"]:
        saved = dict(saved, adapter=adapter_keys(saved["adapter"], stored=True)[1])  # older spellings
    pairs = [(s, k) for s in COMPARED_SECTIONS for k in cur[s] if (s, k) not in RUNTIME_KEYS] + list(COMPARED_KEYS)
    if cur["adapter"]["method"] == "mora":
        pairs += list(MORA_KEYS)
    if cur["model"]["hf_dir"]:  # the shape is read from hf_dir (compared by path); older checkpoints stored defaults
        pairs = [(s, k) for s, k in pairs if not (s == "model" and k in SHAPE_KEYS)]
    diffs = []
    for section, key in pairs:
        # older checkpoints: the default (or the default they were written under)
        old = (saved.get(section) or {}).get(key, LEGACY_DEFAULTS.get((section, key), default[section][key]))
        new = cur[section][key]
        method = cur["adapter"]["method"]
        if old != new and _norm(section, key, old, method) != _norm(section, key, new, method):
            diffs.append(f"{section}.{key}: {old!r} -> {new!r}")
    return diffs
