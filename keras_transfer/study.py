"""Studies: a grid of fine-tuning runs over configuration keys and seeds, run resumably, reported as one.

A study file (YAML)::

    name: depth-and-data            # optional; the default output is runs/<file stem>
    base: experiments/recipe.yaml   # optional: a --config file (relative to the study file), or a mapping
    data: {per_class: 20}           # optional: sections on top of the base, as in a --config file
    strategies: [scratch, linear, partial, full]
    seeds: [0, 1, 2]
    grid:                           # any configuration key, dotted; every combination is a condition
      data.per_class: [5, 10, 20]
      transfer.train_last_k: [0, 1, 2]
    conditions:                     # optional: conditions listed one by one (keys that go together), each
      - {model.name: resnet, model.widths: [8, 16, 32]}    # crossed with every combination of the grid
      - {model.name: mobilenet_v2, model.input_size: 32}
    reference: {data.per_class: 20} # optional: the condition others are compared with (default: the first)
    pretrained: runs/cifar10/pretrain   # optional: every run fine-tunes this model (as finetune --pretrained)
    share_pretraining: true         # default: conditions that pretrain alike share one pretrain run per seed

Each condition x seed is an ordinary fine-tuning run directory (``STUDY/runs/<condition>_seed-<s>``), so
``evaluate``, ``gradcam``, ``predict`` and ``compare`` work on it; pretraining shared by several conditions
is a pretrain run in ``STUDY/pretrain/``. Re-running the same study completes what is missing: finished runs
are kept, an interrupted one resumes from its last epoch, a failed one is tried again.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re

import yaml

from keras_transfer import config as config_lib
from keras_transfer import rundir
from keras_transfer.errors import ConfigError, KTransferError, is_number

STUDY_KEYS = {"name", "description", "base", "grid", "conditions", "seeds", "strategies", "reference", "pretrained",
              "share_pretraining"}
# Keys that only fine-tuning reads (`keras_transfer.runner.pretrain` reads none of them): runs that differ only in
# these can share one pretraining.
FINETUNE_ONLY = ("data.target", "data.per_class", "data.fraction", "finetune.", "transfer.")
# Keys that only pretraining reads: with a given pretrained model (``pretrained:``) they change nothing, except
# the new head's, which fine-tuning builds anew (`keras_transfer.pretrained.with_pretrained`).
PRETRAIN_ONLY = ("data.source", "pretrain.", "model.")
NEW_HEAD = ("model.head_hidden", "model.head_dropout")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass(frozen=True)
class Run:
    """One fine-tuning run of a study.

    Attributes:
        name: str. Its directory under ``STUDY/runs``.
        condition: dict. ``{dotted key: value}`` of the grid for this run.
        label: str. The condition as text (``data.per_class=5, transfer.train_last_k=0``).
        seed: int.
        config: `RunConfig`. The resolved configuration the run directory records.
        pretrain: str or None. Name of the shared pretrain run under ``STUDY/pretrain`` it fine-tunes from.
    """

    name: str
    condition: dict
    label: str
    seed: int
    config: config_lib.RunConfig
    pretrain: str | None = None


@dataclasses.dataclass(frozen=True)
class Study:
    """A study file, resolved and checked: every run's configuration is valid."""

    path: str
    name: str
    description: str
    base: config_lib.RunConfig
    grid: dict
    seeds: tuple
    reference: dict
    runs: tuple
    pretrains: dict  # name -> RunConfig of a shared pretrain run
    document: dict  # what study.yaml records
    listed: tuple = ()  # the conditions listed one by one (``conditions:``), each crossed with the grid

    @property
    def conditions(self):
        return list(dict.fromkeys(r.label for r in self.runs))

    @property
    def keys(self):
        """Every key a condition sets: those of the listed conditions, then the grid's."""
        return list(dict.fromkeys([k for c in self.listed for k in c] + list(self.grid)))


def _fail(path, msg):
    raise ConfigError(f"{path}: {msg}")


def _field_names(section):
    return {f.name for f in dataclasses.fields(config_lib.SECTIONS[section])}


def check_key(key):
    """Raise a `ConfigError` unless ``key`` is ``section.field`` of the run configuration."""
    section, _, field = str(key).partition(".")
    if section not in config_lib.SECTIONS or field not in _field_names(section):
        hint = " (use seeds: for the seed)" if key == "seed" else ""
        raise ConfigError(f"grid: unknown key {key!r}{hint}: expected section.key with a section of "
                          f"{sorted(config_lib.SECTIONS)} and one of its keys (e.g. data.per_class, "
                          f"transfer.train_last_k). Received: {key!r}")


def _set(cfg, key, value):
    """``cfg`` with one dotted key set, ``None`` included (`config_lib.merge` skips None); validated."""
    section, field = key.split(".", 1)
    value = tuple(value) if isinstance(value, list) else value
    try:
        return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{field: value})})
    except (TypeError, ValueError) as e:  # a value of a type the checks do not expect
        raise ConfigError(f"{key}: expected a value of its type. Received: {value!r} ({e})") from None


def apply_condition(cfg, condition):
    """``cfg`` with a condition's ``{dotted key: value}`` set: a new ``model.name`` brings its own default
    input side and channels unless the condition sets them; ``transfer.pretrained`` takes the source and
    model of the run that wrote it (as ``finetune --pretrained``); dataset paths are made absolute."""
    condition = dict(condition)
    name = condition.pop("model.name", None)
    if name is not None:
        if not isinstance(name, str):
            raise ConfigError(f"model.name: expected a registered model name. Received: {name!r}")
        cfg = config_lib.with_model(cfg, name)
    pretrained = condition.pop("transfer.pretrained", None)
    for key, value in condition.items():
        cfg = _set(cfg, key, value)
    if pretrained is not None:
        from keras_transfer.pretrained import with_pretrained

        if not isinstance(pretrained, str):
            raise ConfigError(f"transfer.pretrained: expected a MODEL.keras file or a run directory. "
                              f"Received: {pretrained!r}")
        cfg = with_pretrained(cfg, os.path.abspath(pretrained))
    return config_lib.absolute_paths(cfg)


def _value_text(v):
    if isinstance(v, (list, tuple)):
        return "-".join(_value_text(i) for i in v)
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str) and v.startswith(("folder:", "npz:")):
        v = os.path.basename(v.rstrip("/"))
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(v)).strip("-") or "none"


def _short_keys(keys):
    """Each dotted key by its last part, unless two keys share it."""
    last = [k.split(".", 1)[1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _digest(obj):
    import hashlib

    return hashlib.sha1(repr(obj).encode()).hexdigest()[:6]


def condition_name(condition, short):
    return "_".join(f"{short[k]}-{_value_text(v)}" for k, v in condition.items())


def condition_label(condition):
    return ", ".join(f"{k}={_value_text(v) if isinstance(v, (list, tuple)) else v}" for k, v in condition.items())


def _canonical(condition):
    return repr(sorted((k, list(v) if isinstance(v, tuple) else v) for k, v in condition.items()))


def reference_of(condition, reference, conditions, grid_keys=()):
    """The condition ``condition`` is compared with: the one that has ``reference``'s values and
    ``condition``'s values of the other keys; failing that (a listed condition sets keys the reference does not
    name), the only one with ``reference``'s values and ``condition``'s values of the other ``grid_keys``.
    None when no condition of ``conditions`` (or more than one) fits."""
    want = _canonical({**condition, **reference})
    exact = next((c for c in conditions if _canonical(c) == want), None)
    if exact is not None:
        return exact
    fixed = {**{k: condition.get(k) for k in grid_keys if k not in reference}, **reference}
    fits = [c for c in conditions if all(_canonical({k: c.get(k)}) == _canonical({k: v}) for k, v in fixed.items())]
    return fits[0] if len(fits) == 1 else None


def _pretrain_key(cfg):
    """What pretraining depends on: the configuration with the fine-tuning-only keys at their defaults."""
    d = config_lib.to_dict(cfg)
    default = config_lib.to_dict(config_lib.RunConfig())
    for key in FINETUNE_ONLY:
        section, _, field = key.partition(".")
        if field.rstrip("."):
            d[section][field] = default[section][field]
        else:
            d[section] = default[section]
    return yaml.safe_dump(d, sort_keys=True)


def load_study(path):
    """Read and check a study file: every condition x seed resolves to a valid configuration, or a
    `ConfigError` naming the key at fault is raised before anything runs."""
    doc = config_lib.read_yaml_mapping(path, "study file (YAML)", "study keys and config sections")
    unknown = set(doc) - STUDY_KEYS - set(config_lib.SECTIONS)
    if unknown:
        _fail(path, f"unknown keys {sorted(unknown)}: expected some of {sorted(STUDY_KEYS)} and config sections "
                    f"{sorted(config_lib.SECTIONS)}. Received: {sorted(unknown)}")
    here = os.path.dirname(os.path.abspath(path))
    base = doc.get("base")
    if base is None:
        cfg = config_lib.RunConfig()
    elif isinstance(base, str):
        cfg = config_lib.load(base if os.path.isabs(base) else os.path.join(here, base))
    elif isinstance(base, dict):
        cfg = config_lib.merge(config_lib.RunConfig(), base, keep_none=True)
    else:
        _fail(path, f"base: expected a --config file or a mapping of sections. Received: {base!r}")
    sections = {k: v for k, v in doc.items() if k in config_lib.SECTIONS}
    if sections:
        cfg = config_lib.merge(cfg, sections, keep_none=True)
    strategies = doc.get("strategies")
    if strategies is not None:
        if isinstance(strategies, str):
            strategies = strategies.split(",")
        if not isinstance(strategies, list) or not strategies:
            _fail(path, f"strategies: expected a list of strategies. Received: {strategies!r}")
        cfg = config_lib.merge(cfg, {"transfer": {"strategies": strategies}})
    pretrained = doc.get("pretrained")
    if pretrained is not None:
        if not isinstance(pretrained, str):
            _fail(path, f"pretrained: expected a MODEL.keras file or a pretrain run directory. Received: "
                        f"{pretrained!r}")
        from keras_transfer.pretrained import with_pretrained

        p = pretrained if os.path.isabs(pretrained) else os.path.join(here, pretrained)
        if not os.path.exists(p) and os.path.exists(pretrained):
            p = pretrained  # relative to the working directory
        cfg = with_pretrained(cfg, os.path.abspath(p))
    cfg = config_lib.absolute_paths(cfg)

    grid = doc.get("grid") or {}
    if not isinstance(grid, dict):
        _fail(path, f"grid: expected a mapping of dotted config keys to lists of values. Received: {grid!r}")

    def check_varied(key, where):
        check_key(key)
        if cfg.transfer.pretrained is not None and key.startswith(PRETRAIN_ONLY) and key not in NEW_HEAD:
            raise ConfigError(f"{where}: {key}: has no effect when every run fine-tunes the model given by "
                              f"pretrained: expected a key fine-tuning reads (data.target, data.per_class, "
                              f"data.augment, finetune.*, transfer.*, model.head_hidden, ...). Received: {key}")

    listed = doc.get("conditions") or None  # [] (as study.yaml records a study without them): none
    if listed is not None:
        if not (isinstance(listed, list) and listed and all(isinstance(c, dict) and c for c in listed)):
            _fail(path, f"conditions: expected a non-empty list of mappings, each of dotted config keys to one "
                        f"value (e.g. - {{model.name: mobilenet_v2, model.input_size: 32}}). Received: {listed!r}")
        for i, c in enumerate(listed):
            for key in c:
                check_varied(key, f"conditions[{i}]")
                if key in grid:
                    raise ConfigError(f"conditions[{i}]: {key}: is also a grid key: expected each key in either "
                                      f"grid: or conditions:. Received: {key} in both")
            try:
                apply_condition(cfg, c)
            except KTransferError as e:
                raise ConfigError(f"conditions[{i}]: {str(e).splitlines()[0]}") from None
        texts = [_canonical(c) for c in listed]
        if len(set(texts)) < len(texts):
            _fail(path, f"conditions: expected distinct conditions. Received: {listed!r}")
    listed = [dict(c) for c in listed or []]
    for key, values in grid.items():
        check_varied(key, "grid")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid: {key}: expected a non-empty list of values. Received: {values!r}")
        texts = [repr(v) for v in values]
        if len(set(texts)) < len(texts):
            raise ConfigError(f"grid: {key}: expected distinct values. Received: {values!r}")
        for v in values:  # each value on its own, so the error names the key
            try:
                apply_condition(cfg, {key: v})
            except KTransferError as e:
                raise ConfigError(f"grid: {key}: {str(e).splitlines()[0]}") from None

    seeds = doc.get("seeds", [0, 1, 2])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not (isinstance(seeds, list) and seeds and all(is_number(s, True) and 0 <= s < 2**32 for s in seeds)
            and len(set(seeds)) == len(seeds)):
        _fail(path, f"seeds: expected a list of distinct integers >= 0. Received: {seeds!r}")

    keys = list(dict.fromkeys([k for c in listed for k in c] + list(grid)))
    short = _short_keys(keys)
    conditions = [{**c, **dict(zip(grid, combo))} for c in listed or [{}]
                  for combo in itertools.product(*grid.values())]
    reference = doc.get("reference")
    if reference is None:
        reference = dict(conditions[0])
    elif not isinstance(reference, dict) or set(reference) - set(keys):
        _fail(path, f"reference: expected a mapping of some grid keys ({keys}) to one of their values. "
                    f"Received: {reference!r}")
    else:
        for k, v in reference.items():
            values = grid[k] if k in grid else [c[k] for c in listed if k in c]
            if repr(v) not in [repr(x) for x in values]:
                _fail(path, f"reference: {k}: expected one of the study's values {values}. Received: {v!r}")
        if not any(reference_of(c, reference, conditions, grid) for c in conditions):
            _fail(path, f"reference: expected the values of one condition. Received: {reference!r}, which no "
                        f"condition has together")

    share = doc.get("share_pretraining", True)
    if not isinstance(share, bool):
        _fail(path, f"share_pretraining: expected true or false. Received: {share!r}")
    runs, pretrains, names_of = [], {}, {}
    pretrain_keys = [k for k in keys if not k.startswith(FINETUNE_ONLY)]
    cond_names = [condition_name(c, short) for c in conditions]
    if len(set(cond_names)) < len(cond_names):  # values that read alike (npz:a/x.npz, npz:b/x.npz): a hash tells
        cond_names = [f"{n}_{_digest(c)}" if cond_names.count(n) > 1 else n for n, c in zip(cond_names, conditions)]
    for condition, cond_name in zip(conditions, cond_names):
        try:
            cond_cfg = apply_condition(cfg, condition)
        except KTransferError as e:
            raise ConfigError(f"grid: condition {condition_label(condition)}: {str(e).splitlines()[0]}") from None
        for seed in seeds:
            run_cfg = config_lib.merge(cond_cfg, {"seed": seed})
            pre = None
            if share and config_lib.needs_pretraining(run_cfg):
                pkey = _pretrain_key(run_cfg)
                if pkey not in names_of:
                    pcond = {k: condition[k] for k in pretrain_keys if k in condition}
                    pname = "_".join(filter(None, [condition_name(pcond, short), f"seed-{seed}"]))
                    if pname in pretrains:
                        pname = f"{pname}_{_digest(pkey)}"
                    names_of[pkey] = pname
                    pretrains[pname] = run_cfg
                pre = names_of[pkey]
            name = "_".join(filter(None, [cond_name, f"seed-{seed}"]))
            runs.append(Run(name, condition, condition_label(condition), seed, run_cfg, pre))
    name = doc.get("name") or os.path.splitext(os.path.basename(path))[0]
    if not (isinstance(name, str) and NAME.match(name)):
        _fail(path, f"name: expected letters, digits, '.', '_' or '-' (it names the output directory). "
                    f"Received: {name!r}")
    document = {"name": name,
                "description": str(doc.get("description") or ""),
                "base": config_lib.to_dict(cfg), "grid": grid, "conditions": listed, "seeds": seeds,
                "reference": reference, "share_pretraining": share}
    return Study(os.path.abspath(path), document["name"], document["description"], cfg, grid, tuple(seeds),
                 reference, tuple(runs), pretrains, document, tuple(listed))


def run_config(study, run, study_dir):
    """The configuration ``run`` records in its directory: with the shared pretrain run's model as
    ``transfer.pretrained`` where it fine-tunes from one."""
    if run.pretrain is None:
        return run.config
    model = os.path.abspath(rundir.model_path(pretrain_path(study_dir, run.pretrain)))
    return dataclasses.replace(run.config, transfer=dataclasses.replace(run.config.transfer, pretrained=model))


def run_path(study_dir, run):
    return os.path.join(study_dir, rundir.STUDY_RUNS, run.name)


def pretrain_path(study_dir, name):
    return os.path.join(study_dir, rundir.STUDY_PRETRAIN, name)


def _first_difference(a, b, prefix=""):
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _first_difference(va, vb, f"{prefix}{k}.")
            if d:
                return d
        elif va != vb:
            return f"{prefix}{k}: {va!r} -> {vb!r}"
    return None


def check_compatible(study, study_dir):
    """Raise a `ConfigError` when a run directory the study would use holds a run of another configuration
    (the study file changed in a way that would mix incompatible runs in one directory). A shared pretrain
    run is compared on what pretraining depends on only."""
    triples = [(run_path(study_dir, r), run_config(study, r, study_dir), False) for r in study.runs]
    triples += [(pretrain_path(study_dir, n), c, True) for n, c in study.pretrains.items()]
    for d, cfg, shared_pretrain in triples:
        path = rundir.config_path(d)
        if not os.path.isfile(path):
            continue
        try:
            recorded = config_lib.load(path)
        except KTransferError as e:
            raise ConfigError(f"{path}: expected the configuration of this study's run. Received: "
                              f"{str(e).splitlines()[0]}") from None
        if shared_pretrain:
            same = _pretrain_key(recorded) == _pretrain_key(cfg)
        else:
            same = config_lib.to_dict(recorded) == config_lib.to_dict(cfg)
        if not same:
            diff = _first_difference(config_lib.to_dict(recorded), config_lib.to_dict(cfg))
            raise ConfigError(f"{d} holds a run of another configuration than this study asks for ({diff}): "
                              f"expected the study file it was started with, or a new --out. Received: "
                              f"{study.path}")


def plan(study, study_dir):
    """``[(kind, name, directory, state)]`` for every pretrain run and run, ``state`` one of ``finished``,
    ``partial`` (started, resumable), ``failed`` (its last attempt failed) or ``missing``."""
    rows = []
    for name in study.pretrains:
        rows.append(("pretrain", name, pretrain_path(study_dir, name)))
    for r in study.runs:
        rows.append(("run", r.name, run_path(study_dir, r)))
    out = []
    for kind, name, d in rows:
        if rundir.is_finished(d):
            state = "finished"
        elif os.path.isfile(rundir.error_path(d)):
            state = "failed"
        elif os.path.isfile(rundir.config_path(d)):
            state = "partial"
        else:
            state = "missing"
        out.append((kind, name, d, state))
    return out
