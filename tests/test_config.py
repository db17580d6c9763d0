"""keras_transfer.config: YAML null sets a key to None (every training image), command-line None leaves it; a run's
config.yaml reads back to the configuration that wrote it."""

from keras_transfer import config as config_lib


def test_yaml_null_sets_a_key_to_none_and_an_absent_option_does_not(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  per_class: null\n  fraction: 0.5\nmodel:\n  weights: null\n")
    cfg = config_lib.load(str(path))
    assert cfg.data.per_class is None and cfg.data.fraction == 0.5
    # a command-line option that was not given (None) keeps the file's value
    assert config_lib.merge(cfg, {"data": {"per_class": None}}).data.per_class is None
    assert config_lib.merge(config_lib.RunConfig(), {"data": {"per_class": None}}).data.per_class == 20
    full = config_lib.merge(config_lib.RunConfig(), {"data": {"per_class": None}}, keep_none=True)
    assert full.data.per_class is None


def test_a_saved_config_reads_back_equal_none_values_included(tmp_path):
    cfg = config_lib.merge(config_lib.RunConfig(), {"data": {"per_class": None, "fraction": 0.25},
                                                    "transfer": {"freeze_until": None}}, keep_none=True)
    path = str(tmp_path / "config.yaml")
    config_lib.save(cfg, path)
    assert config_lib.load(path) == cfg


def test_needs_pretraining_only_when_something_transfers_from_the_source():
    base = config_lib.RunConfig()
    assert config_lib.needs_pretraining(base)
    assert not config_lib.needs_pretraining(config_lib.merge(base, {"transfer": {"strategies": ["scratch"]}}))
    assert not config_lib.needs_pretraining(config_lib.merge(base, {"model": {"weights": "imagenet"}}))
